"""The MQTT bridge against a real Mosquitto: bad input is counted and survived, statuses and telemetry
reach the database, desired states are retained, the bridge reconnects, and the app lifespan hook runs
the controller through it."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import time
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import select

from edgepack.protocol import (
    BundleRef, DesiredState, DeviceStatus, Telemetry, desired_topic, encode, status_topic, telemetry_topic,
)
from fleet import metrics
from fleet.models import Device, TelemetryWindow
from fleet.mqtt_bridge import MqttBridge, lifespan_hook, parse_mqtt_url
from fleet.services.rollouts import create_rollout
from fleet.settings import FleetSettings
from tests.fleet.rollout_helpers import add_bundle, add_device, session_factory_at

SHA = "ab" * 32


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class DeviceClient:
    """A plain paho client standing in for a device (or an attacker) on the broker."""

    def __init__(self, url: str, client_id: str) -> None:
        endpoint = parse_mqtt_url(url)
        self.received: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = lambda client, userdata, message: self.received.put(message)
        self.client.connect(endpoint["host"], endpoint["port"])
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def subscribe(self, topic: str) -> None:
        subscribed = queue.Queue()
        self.client.on_subscribe = lambda *args: subscribed.put(True)
        self.client.subscribe(topic, qos=1)
        subscribed.get(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def database(tmp_path):
    session_factory = session_factory_at(tmp_path)
    with session_factory() as session:
        add_device(session, "dev-1", "rpi5")
    return session_factory


@pytest.fixture
def bridge(mosquitto, database, request):
    with MqttBridge(mosquitto.url, database, client_id=f"fleet-{request.node.name}"[:60], log_interval_s=60) as bridge:
        assert bridge.wait_ready(10), "the bridge did not connect and subscribe"
        yield bridge


@pytest.fixture
def device(mosquitto, request):
    client = DeviceClient(mosquitto.url, f"device-{request.node.name}"[:60])
    yield client
    client.close()


def _status(device_id: str = "dev-1", **fields) -> bytes:
    return encode(DeviceStatus(device_id=device_id, **fields))


def test_garbage_on_device_topics_is_counted_and_the_bridge_keeps_processing(bridge, device, database, caplog):
    dropped_before = metrics.REGISTRY.get_sample_value("edgepack_mqtt_malformed_messages_total") or 0.0
    topic = status_topic("dev-1")
    garbage = [
        (topic, b"{not json", "malformed_json"),
        (topic, b"{not json either", "malformed_json"),
        (topic, b"[1, 2, 3]", "malformed_json"),
        (topic, json.dumps({"schema_version": 99, "device_id": "dev-1"}).encode(), "unknown_schema"),
        (topic, json.dumps({"schema_version": 1, "device_id": "dev-1", "pad": "x" * 200_000}).encode(), "oversized"),
        (topic, json.dumps({"schema_version": 1, "device_id": "dev+1", "phase": "active"}).encode(), "invalid_message"),
        (topic, json.dumps({"schema_version": 1, "device_id": "dev-1", "phase": "exploded"}).encode(), "invalid_message"),
        ("edgepack/v1/devices/bad!id/status", _status(), "bad_topic"),
        (topic, _status("dev-2"), "device_mismatch"),
        (status_topic("dev-2"), _status("dev-2"), "unknown_device"),
        (telemetry_topic("dev-1"), b"\xff\xfe\x00", "malformed_json"),
    ]
    caplog.set_level(logging.WARNING, logger="fleet.mqtt_bridge")

    for garbage_topic, payload, _ in garbage:
        device.publish(garbage_topic, payload)
    device.publish(topic, _status(seq=0, phase="active", current_bundle=SHA), retain=True)

    wait_for(lambda: bridge.processed["status"] == 1, what="the valid status after the garbage")
    expected = {}
    for _, _, reason in garbage:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(bridge.malformed) == expected
    assert not bridge.errors
    with database() as session:
        stored = session.get(Device, "dev-1")
        assert (stored.phase, stored.current_bundle_id, stored.online) == ("active", SHA, True)
    dropped_after = metrics.REGISTRY.get_sample_value("edgepack_mqtt_malformed_messages_total")
    assert dropped_after - dropped_before == len(garbage)
    lines = [r.getMessage() for r in caplog.records if "dropped a message" in r.getMessage()]
    assert len(lines) == len(expected)  # one line per reason while rate-limited, not one per message
    assert all("\n" not in line for line in lines)


def test_telemetry_is_stored(bridge, device, database):
    window = Telemetry(device_id="dev-1", bundle_id=SHA, window_s=10, inferences=500, errors=2,
                       latency_ms={"p50": 1.0, "p95": 2.5, "p99": 4.0}, drift={"input": 0.05})

    device.publish(telemetry_topic("dev-1"), encode(window))

    wait_for(lambda: bridge.processed["telemetry"] == 1, what="telemetry")
    with database() as session:
        row = session.scalars(select(TelemetryWindow)).one()
    assert (row.device_id, row.inferences, row.errors, row.p95_ms, row.drift) == ("dev-1", 500, 2, 2.5, {"input": 0.05})


def test_a_retained_desired_state_reaches_a_device_that_subscribes_later(bridge, mosquitto):
    desired = DesiredState(rollout_id="r-1", seq=7, action="install", issued_at=1.5,
                           bundle=BundleRef(id=SHA, name="digits", version="2.0.0", profile="rpi5", sha256=SHA,
                                            size=10, url="/api/v1/bundles/x/download"))

    assert bridge.publish_desired("dev-1", desired) is True

    late = DeviceClient(mosquitto.url, "late-device")
    try:
        late.subscribe(desired_topic("dev-1"))
        message = late.received.get(timeout=10)
    finally:
        late.close()
    assert message.retain and message.payload == encode(desired)


def test_many_desired_states_go_out_pipelined_and_each_is_retained(bridge, mosquitto):
    states = [(f"dev-{i}", DesiredState(rollout_id="r-1", seq=i + 1, action="rollback")) for i in range(300)]

    assert bridge.publish_desired_many(states, window=64) == [True] * 300

    late = DeviceClient(mosquitto.url, "late-reader")
    try:
        for device_id, desired in (states[0], states[150], states[-1]):
            late.subscribe(desired_topic(device_id))
            message = late.received.get(timeout=10)
            assert message.retain and message.payload == encode(desired)
    finally:
        late.close()


def test_publishing_while_disconnected_reports_failure(mosquitto, database):
    bridge = MqttBridge(mosquitto.url, database, client_id="never-started")
    desired = DesiredState(seq=1, action="rollback")

    assert bridge.publish_desired("dev-1", desired) is False
    assert bridge.publish_desired_many([("dev-1", desired), ("dev-2", desired)]) == [False, False]


def test_the_bridge_reconnects_after_a_broker_restart(bridge, mosquitto, database):
    mosquitto.restart()
    wait_for(lambda: not bridge.subscribed.is_set() or bridge.processed, timeout_s=5, what="the disconnect")

    assert bridge.wait_ready(40), "the bridge did not reconnect"
    device = DeviceClient(mosquitto.url, "device-after-restart")
    try:
        device.publish(status_topic("dev-1"), _status(seq=0, phase="idle"))
        wait_for(lambda: bridge.processed["status"] == 1, what="a status after the restart")
    finally:
        device.close()


def test_lifespan_hook_runs_the_controller_through_the_bridge(mosquitto, database, tmp_path):
    with database() as session:
        bundle = add_bundle(session, "digits", "2.0.0", "rpi5")
        rollout = create_rollout(session, "alice", bundle.id, {}, waves=[100], gates=None, bake_s=0, min_reports=1,
                                 install_timeout_s=60)
    settings = FleetSettings(data_dir=tmp_path, mqtt_url=mosquitto.url, public_url="http://fleet.example:8080")
    app = SimpleNamespace(state=SimpleNamespace(settings=settings, session_factory=database, engine=database.kw["bind"]))
    device = DeviceClient(mosquitto.url, "dev-1")
    device.subscribe(desired_topic("dev-1"))

    async def run_app():
        async with lifespan_hook(app):
            message = await asyncio.to_thread(device.received.get, timeout=15)
            assert app.state.mqtt_bridge.wait_ready(10)
            # the device installs and says so over MQTT; the controller promotes the only wave
            desired = DesiredState.model_validate_json(message.payload)
            device.publish(status_topic("dev-1"), _status(seq=desired.seq, rollout_id=desired.rollout_id,
                                                          phase="active", current_bundle=desired.bundle.id))
            await asyncio.to_thread(wait_for, lambda: _status_of(database, rollout["id"]) == "succeeded", 15,
                                    "the rollout to succeed")
            return desired

    try:
        desired = asyncio.run(run_app())
    finally:
        device.close()
    assert desired.action == "install" and desired.rollout_id == rollout["id"]
    assert desired.bundle.url == f"http://fleet.example:8080/api/v1/bundles/{bundle.id}/download"
    assert app.state.mqtt_bridge.connected.is_set() is False  # stopped on the way out


def _status_of(session_factory, rollout_id):
    from fleet.models import Rollout

    with session_factory() as session:
        return session.get(Rollout, rollout_id).status


def _window(inferences: int) -> bytes:
    return encode(Telemetry(device_id="dev-1", window_s=10, inferences=inferences, errors=0))


def test_a_persistent_session_gets_the_telemetry_published_while_the_bridge_was_down(mosquitto, database, device):
    first = MqttBridge(mosquitto.url, database, client_id="fleet-persistent", persistent_session=True).start()
    assert first.wait_ready(10)
    first.stop()

    for inferences in range(5):  # nobody consumes these: the broker queues them in the bridge's session
        device.publish(telemetry_topic("dev-1"), _window(inferences))
    with MqttBridge(mosquitto.url, database, client_id="fleet-persistent", persistent_session=True) as second:
        # paho hands the queued messages to on_message as they arrive after the CONNACK, whether or not the
        # renewed SUBACK came first; each is acknowledged only after it was stored
        wait_for(lambda: second.processed["telemetry"] == 5, what="the five queued windows")
        assert second.wait_ready(10)
    with database() as session:
        assert sorted(session.scalars(select(TelemetryWindow.inferences))) == [0, 1, 2, 3, 4]


def test_a_clean_session_does_not_get_what_was_published_while_it_was_down(mosquitto, database, device):
    first = MqttBridge(mosquitto.url, database, client_id="fleet-clean", persistent_session=False).start()
    assert first.wait_ready(10)
    first.stop()

    for inferences in range(3):
        device.publish(telemetry_topic("dev-1"), _window(inferences))
    with MqttBridge(mosquitto.url, database, client_id="fleet-clean", persistent_session=False) as second:
        assert second.wait_ready(10)
        device.publish(status_topic("dev-1"), _status(seq=0, phase="idle"))  # published after the subscription
        wait_for(lambda: second.processed["status"] == 1, what="the status published after the reconnect")
    assert second.processed["telemetry"] == 0
