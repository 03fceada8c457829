"""The topic rights of each identity, as data both brokers read (Mosquitto via dynsec ACLs, the embedded
broker via `may_publish`/`may_subscribe`). MQTT wildcards in a device's request never widen them: a
device's allowed topics are literal, so `edgepack/#` or `…/+/desired` match none of them."""

from __future__ import annotations

from edgepack.errors import ProtocolError
from edgepack.protocol import TOPIC_ROOT, desired_topic, status_topic, telemetry_topic, validate_device_id

FLEET_USERNAME = "edgepack-fleet"


def device_publish_topics(device_id: str) -> tuple[str, ...]:
    return (status_topic(device_id), telemetry_topic(device_id))


def device_subscribe_topics(device_id: str) -> tuple[str, ...]:
    return (desired_topic(device_id),)


FLEET_PUBLISH = (f"{TOPIC_ROOT}/+/desired",)
# Everything under the device root (status, telemetry, and the desired states it published), plain or as a
# shared subscription ($share/GROUP/…) for replicas later.
FLEET_SUBSCRIBE = (f"{TOPIC_ROOT}/#", f"$share/+/{TOPIC_ROOT}/#")


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching: does `topic` (or a subscription filter, compared level by level) fall under
    `pattern`? A `+`/`#` in `topic` only matches the same wildcard in `pattern` (a request for
    `edgepack/#` is not covered by `edgepack/v1/devices/A/desired`)."""
    want, got = pattern.split("/"), topic.split("/")
    for index, level in enumerate(want):
        if level == "#":
            return True
        if index >= len(got):
            return False
        if level == "+":
            if got[index] == "#":
                return False
            continue
        if level != got[index]:
            return False
    return len(want) == len(got)


def may_publish(username: str | None, topic: str, *, fleet_username: str = FLEET_USERNAME) -> bool:
    if not username:
        return False
    if username == fleet_username:
        return any(topic_matches(p, topic) for p in FLEET_PUBLISH)
    return topic in device_publish_topics(username) if _valid_id(username) else False


def may_subscribe(username: str | None, topic_filter: str, *, fleet_username: str = FLEET_USERNAME) -> bool:
    """Also the check for receiving a message on `topic_filter` (a topic)."""
    if not username:
        return False
    if username == fleet_username:
        return any(topic_matches(p, topic_filter) for p in FLEET_SUBSCRIBE)
    return topic_filter in device_subscribe_topics(username) if _valid_id(username) else False


def _valid_id(username: str) -> bool:
    try:
        validate_device_id(username)
    except ProtocolError:
        return False
    return True


__all__ = ["FLEET_PUBLISH", "FLEET_SUBSCRIBE", "FLEET_USERNAME", "device_publish_topics", "device_subscribe_topics",
           "may_publish", "may_subscribe", "topic_matches"]
