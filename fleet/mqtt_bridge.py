"""The fleet's MQTT side: consumes device status and telemetry, publishes retained desired states.

    edgepack/v1/devices/+/status      → decoded here, stored in batches by fleet.ingest (store_batch)
    edgepack/v1/devices/+/telemetry   → the same; then (with a drift policy) fleet.services.alerts.check_drift
                                        for the windows that could raise or clear a drift alert
    edgepack/v1/devices/{id}/desired  ← publish_desired() (retained, QoS 1, waits for the PUBACK)

paho-mqtt 2 runs the network loop in its own thread and reconnects by itself (backoff 1 → 30 s);
subscriptions are renewed on every connect. With a persistent session (`persistent_session`, the
server's default: clean_session=False under a client id kept across restarts) the broker queues the QoS 1
status and telemetry published while the server is down and delivers them after its CONNACK; paho hands
them to `on_message`, set before connecting, which checks and queues them for the writers (fleet.ingest);
each is acknowledged (manual PUBACK) only once its batch is committed, so a window is stored at least once
(a crash before the PUBACK redelivers it) and, by its window key, exactly once.

The broker already refuses a device any topic but its own (fleet.broker); the bridge checks again: a
device over its message budget (a token bucket per device: `device_message_rate` messages a second,
bursts of `device_message_burst`) is ignored past it, counted in `bridge.throttled` and
`edgepack_mqtt_throttled_total`, before its payload is even decoded, so a flooding device costs the others
nothing; a message whose payload names another device than its topic, or from a device that is not
enrolled or was revoked, is dropped and counted (`edgepack_mqtt_rejected_messages{reason}`). A message that is not a valid v1 message from the enrolled
device its topic names is dropped, counted in `bridge.malformed[reason]` (and in
`fleet.metrics.MQTT_MALFORMED`), and logged in one line at most every `log_interval_s` per reason. No
message can raise out of the callback.

`lifespan_hook(app)` runs the bridge, the rollout controller thread and (with a webhook configured) the
alert dispatcher thread for the life of the FastAPI app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections import Counter
from typing import Any, AsyncIterator, Callable, Sequence

from sqlalchemy.orm import Session, sessionmaker

from edgepack.errors import ConfigError, ProtocolError
from edgepack.mqtt import MqttEndpoint, redact_url
from edgepack.protocol import (
    MAX_PAYLOAD_BYTES, SCHEMA_VERSION, TOPIC_ROOT, DesiredState, DeviceStatus, Telemetry, decode, desired_topic, encode,
    parse_topic,
)
from fleet.controller import RolloutController, count_metric, default_bundle_url
from fleet.ingest import Ingestor, store_messages
from fleet.models import Alert, utcnow
from fleet.services.alerts import AlertDispatcher, DriftAlertPolicy
from fleet.services.gates import FAILED_PHASES
from fleet.services.status import Inbound
from fleet.settings import FleetSettings, resolve_mqtt_client_id

log = logging.getLogger(__name__)

STATUS_SUBSCRIPTION = f"{TOPIC_ROOT}/+/status"
TELEMETRY_SUBSCRIPTION = f"{TOPIC_ROOT}/+/telemetry"
INSTALL_ENDS = FAILED_PHASES | {"active"}  # the statuses a rollout wave waits for
MALFORMED_REASONS = ("bad_topic", "oversized", "malformed_json", "unknown_schema", "invalid_message",
                     "device_mismatch", "unknown_device", "revoked_device")
# well-formed messages from someone who may not speak for that device
REJECTED_REASONS = ("device_mismatch", "unknown_device", "revoked_device")


def parse_mqtt_url(url: str) -> dict[str, Any]:
    """host, port, tls, username, password of `mqtt://[user:pass@]host[:port]` (`mqtts://` for TLS).
    (edgepack.mqtt.MqttEndpoint.from_url is the parser; this dict form is kept for existing callers.)"""
    return MqttEndpoint.from_url(url).model_dump(include={"host", "port", "tls", "username", "password"})


def redact_mqtt_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return redact_url(url)


def check_broker(url: str | MqttEndpoint, timeout_s: float = 5.0) -> None:
    """Refuse to start against a broker nothing answers at, or one whose TLS certificate the configured CA
    does not trust: one ConfigError naming the URL (no password), before anything else starts. A running
    bridge keeps retrying instead (a broker may restart under it)."""
    endpoint = url if isinstance(url, MqttEndpoint) else MqttEndpoint.from_url(url)
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"MQTT broker {endpoint.redacted()} is unreachable: {reason} (check --mqtt-url)",
                          url=endpoint.redacted()) from None
    endpoint.probe_tls(timeout_s)


def _malformed_reason(payload: bytes) -> str:
    """Which check a payload that failed to decode failed first (for the counters)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return "oversized"
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return "malformed_json"
    if not isinstance(data, dict):
        return "malformed_json"
    if data.get("schema_version") != SCHEMA_VERSION:
        return "unknown_schema"
    return "invalid_message"


class _RateLimitedLog:
    """One warning line per key at most every `interval_s`, saying how many were suppressed since."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e18) < self.interval_s:
                self._suppressed[key] += 1
                return
            self._last[key] = now
            suppressed, self._suppressed[key] = self._suppressed[key], 0
        if suppressed:
            message += f" ({suppressed} more like it since the last line)"
        log.warning(message, *args)


class DeviceBudget:
    """A token bucket per device: `rate` messages a second, at most `burst` at once. Bounded memory: past
    `max_devices` tracked ids the table starts over (every device gets a full bucket again)."""

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic,
                 max_devices: int = 100_000) -> None:
        self.rate, self.burst, self.clock, self.max_devices = rate, burst, clock, max_devices
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, device_id: str) -> bool:
        """One message's worth; False when the device is over its budget."""
        now = self.clock()
        with self._lock:
            if device_id not in self._buckets and len(self._buckets) >= self.max_devices:
                self._buckets.clear()
            tokens, last = self._buckets.get(device_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[device_id] = (tokens - 1.0 if allowed else tokens, now)
            return allowed


class MqttBridge:
    """The fleet's MQTT client; also the rollout controller's publisher."""

    def __init__(
        self,
        mqtt_url: str,
        session_factory: sessionmaker[Session],
        client_id: str = "edgepack-fleet",
        *,
        publish_timeout_s: float = 5.0,
        log_interval_s: float = 10.0,
        keepalive_s: int = 30,
        persistent_session: bool = False,
        drift_policy: DriftAlertPolicy | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        endpoint: MqttEndpoint | None = None,
        budget: DeviceBudget | None = None,
        ingest_queue: int = 20_000,
        ingest_batch: int = 500,
        ingest_writers: int = 1,
        share_group: str | None = None,
    ) -> None:
        self.mqtt_url = mqtt_url
        # The URL's host, port and credentials, plus the TLS files (FleetSettings.mqtt_endpoint) when given.
        self.endpoint = endpoint or MqttEndpoint.from_url(mqtt_url)
        self.session_factory = session_factory
        self.client_id = client_id
        self.publish_timeout_s = publish_timeout_s
        self.keepalive_s = keepalive_s
        # A persistent session makes the broker keep QoS 1 telemetry for the bridge while it is down; it
        # needs a client id no other server uses, or the two would keep disconnecting each other.
        self.persistent_session = persistent_session
        # Drift alerts outside rollouts: checked after each stored telemetry window; `on_alert` hears of new ones.
        self.drift_policy = drift_policy
        self.on_alert = on_alert
        # Hears of every stored status that ends an install (active, failed, rolled_back): the rollout
        # controller's notify(), so a wave is judged when its last device answers, not at the next pass.
        self.on_install_end: Callable[[], None] | None = None
        self.malformed: Counter[str] = Counter()
        self.throttled: Counter[str] = Counter()
        self.budget = budget
        self.processed: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # set once the broker granted the subscriptions of this connection
        self._log = _RateLimitedLog(log_interval_s)
        self._client = None
        # The writers that store what the network thread decodes, in batches (fleet.ingest).
        # With a share group, replicas split the device messages: the broker hands each to one of them.
        prefix = f"$share/{share_group}/" if share_group else ""
        self.subscriptions = [(prefix + STATUS_SUBSCRIPTION, 1), (prefix + TELEMETRY_SUBSCRIPTION, 1)]
        self.ingestor = Ingestor(session_factory, max_queue=ingest_queue, batch=ingest_batch, writers=ingest_writers,
                                 drift_policy=drift_policy, on_alert=self._alert, on_stored=self._stored)
        self._accepting = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "MqttBridge":
        """Connect in the background (retrying until the broker is there) and start the network thread."""
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=not self.persistent_session,
                             protocol=mqtt.MQTTv311, manual_ack=True)
        self.endpoint.apply(client)  # credentials; with mqtts:// the broker verified against the CA, host name included
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client
        self.ingestor.start()
        self._accepting = True
        client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=self.keepalive_s)
        client.loop_start()
        return self

    def wait_connected(self, timeout_s: float) -> bool:
        return self.connected.wait(timeout_s)

    def wait_ready(self, timeout_s: float) -> bool:
        """Connected and subscribed: from now on every device message reaches the bridge."""
        return self.subscribed.wait(timeout_s)

    def stop(self, drain_s: float = 10.0) -> None:
        """Store what was queued and acknowledge it, then disconnect. Messages arriving meanwhile are left
        unacknowledged: with a persistent session the broker hands them to the next server."""
        client = self._client
        if client is None:
            return
        self._accepting = False
        if not self.ingestor.drain(drain_s):
            log.warning("MQTT bridge: %d messages still queued at shutdown; the broker redelivers them", self.ingestor.depth)
        self._client = None
        client.disconnect()
        client.loop_stop()
        self.ingestor.stop()
        self.connected.clear()
        self.subscribed.clear()

    def __enter__(self) -> "MqttBridge":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ paho callbacks (network thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._log.warning("connect", "MQTT connect to %s refused: %s", self.mqtt_url, reason_code)
            return
        client.subscribe(self.subscriptions)
        self.connected.set()
        log.info("MQTT bridge connected to %s as %s", self.mqtt_url, self.client_id)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            self._log.warning("subscribe", "MQTT broker refused the bridge's subscriptions: %s", refused)
            return
        self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if self._client is not None:
            self._log.warning("disconnect", "MQTT bridge lost %s (%s); reconnecting", self.mqtt_url, reason_code)

    def _on_message(self, client, userdata, message) -> None:
        # Acknowledged once stored (the writers call `ack`), or at once when the message is dropped here.
        ack = (lambda: client.ack(message.mid, message.qos)) if message.qos > 0 else None
        if not self._accepting:
            return  # stopping: unacknowledged, the broker redelivers it to the next server
        try:
            accepted = self.accept(message.topic, message.payload, ack=ack)
        except Exception as exc:  # nothing may kill paho's thread; the message is counted
            self.errors[type(exc).__name__] += 1
            log.exception("MQTT bridge: handling a message on %r failed", message.topic)
            accepted = None
        if accepted is None and ack is not None:
            ack()

    # ------------------------------------------------------------ messages

    def _inbound(self, topic: str, payload: bytes) -> Inbound | str:
        """The checks the MQTT thread makes before queueing: the decoded message, or what became of it
        (`ignored`, `throttled`, `dropped:<reason>`)."""
        if not payload:
            return "ignored"  # a retained message being cleared
        try:
            device_id, kind = parse_topic(topic)
        except ProtocolError as exc:
            return self._drop("bad_topic", topic, exc.message)
        if kind not in ("status", "telemetry"):
            return "ignored"
        if self.budget is not None and not self.budget.take(device_id):
            self.throttled[kind] += 1
            count_metric("MQTT_THROTTLED", reason=kind)
            self._log.warning(f"throttled:{device_id}", "MQTT bridge ignored a %s of device %s: over its message "
                              "budget", kind, device_id)
            return "throttled"
        model = DeviceStatus if kind == "status" else Telemetry
        try:
            message = decode(model, payload)
        except ProtocolError as exc:
            return self._drop(_malformed_reason(payload), topic, exc.message)
        if message.device_id != device_id:
            return self._drop("device_mismatch", topic, f"payload names device {message.device_id!r}")
        return Inbound(kind=kind, message=message, received_at=utcnow(), payload=bytes(payload), topic=topic)

    def accept(self, topic: str, payload: bytes, *, ack: Callable[[], None] | None = None) -> Inbound | None:
        """Check one message in the MQTT thread and queue it for the writers (which call `ack` once it is
        stored); None when it went no further (dropped, throttled or ignored: the caller acknowledges it)."""
        inbound = self._inbound(topic, payload)
        if isinstance(inbound, str):
            return None
        inbound.ack = ack
        self.ingestor.submit(inbound)  # False when stopping: then it stays unacknowledged, for the next server
        return inbound

    def handle_message(self, topic: str, payload: bytes) -> str:
        """Apply one device message now, in its own transaction; returns its kind (`status`, `telemetry`),
        `duplicate` (a window stored before), `ignored`, `throttled` or `dropped:<reason>`."""
        inbound = self._inbound(topic, payload)
        if isinstance(inbound, str):
            return inbound
        result = store_messages(self.session_factory, [inbound], self.drift_policy, self._alert).outcomes[0]
        self._stored(inbound, result)
        return "status" if result == "stale" else result

    def _stored(self, item: Inbound, result: str) -> None:
        """A writer stored (or refused) one message: the counters, and the log line of a refusal."""
        if result.startswith("dropped:"):
            reason = result.split(":", 1)[1]
            why = "is not enrolled" if reason == "unknown_device" else "is revoked"
            self._drop(reason, item.topic, f"device {item.message.device_id} {why}")
            return
        kind = "status" if result == "stale" else result
        self.processed[kind] += 1
        if kind in ("status", "telemetry"):
            count_metric("MQTT_MESSAGES", kind=kind)
        if (result == "status" and self.on_install_end is not None and item.message.seq > 0
                and item.message.phase in INSTALL_ENDS):
            self.on_install_end()

    def _alert(self, alert: Alert | None) -> None:
        if alert is None:
            return
        self.processed["alert"] += 1
        if self.on_alert is not None:
            self.on_alert(alert)

    def _drop(self, reason: str, topic: str, detail: str) -> str:
        self.malformed[reason] += 1
        count_metric("MQTT_MALFORMED", reason=reason)
        if reason in REJECTED_REASONS:  # also by reason: who tried to speak for a device it is not
            count_metric("MQTT_REJECTED", reason=reason)
        self._log.warning(f"malformed:{reason}", "MQTT bridge dropped a message on %r: %s: %s",
                          topic[:200], reason, detail[:200])
        return f"dropped:{reason}"

    # ------------------------------------------------------------ the controller's publisher

    def publish_desired(self, device_id: str, desired: DesiredState) -> bool:
        """Publish a desired state retained with QoS 1; True once the broker acknowledged it."""
        return self.publish_desired_many([(device_id, desired)])[0]

    def publish_desired_many(self, items: Sequence[tuple[str, DesiredState]], window: int = 1000) -> list[bool]:
        """publish_desired for many states, pipelined: up to `window` on the wire before the first wait
        (paho keeps its own in-flight limit); True for each the broker acknowledged in time."""
        client = self._client
        if client is None or not self.connected.is_set():
            return [False] * len(items)
        results: list[bool] = []
        for start in range(0, len(items), window):
            chunk = items[start:start + window]
            infos = [client.publish(desired_topic(device_id), encode(desired), qos=1, retain=True)
                     for device_id, desired in chunk]
            deadline = time.monotonic() + self.publish_timeout_s
            for info in infos:
                try:
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                except (RuntimeError, ValueError):
                    pass
                ok = info.is_published()
                if ok:
                    count_metric("DESIRED_PUBLISHED")
                results.append(ok)
        return results


def _bundle_url_for(settings: FleetSettings, store: Any) -> Callable[[Any], str]:
    """Where a desired state tells devices to download: a presigned object-store URL when the store gives
    them (the agent falls back to the fleet's route once it expires), else the fleet's own route."""
    base = settings.public_url.rstrip("/") if settings.public_url else ""

    def url(bundle: Any) -> str:
        presigned = store.presign(bundle.id) if store is not None else None
        return presigned if presigned else base + default_bundle_url(bundle)

    return url


@contextlib.asynccontextmanager
async def lifespan_hook(app: Any) -> AsyncIterator[None]:
    """Run the MQTT bridge and the rollout controller thread while the app runs.

    Reads `app.state.settings` (a FleetSettings: `mqtt_url`, `mqtt_client_id` — None uses the id kept in
    the data folder —, `mqtt_persistent_session`, `public_url` for absolute download URLs,
    `controller_interval_s`, `drift_alert_threshold`, `alert_repeat_s`, `alert_webhook_url`)
    and `app.state.session_factory`; exposes `app.state.mqtt_bridge`, `app.state.rollout_controller` and
    `app.state.alert_dispatcher` (None without a webhook: alerts are still raised and listed, and go out once
    a server with a webhook runs).
    """
    settings: FleetSettings = app.state.settings
    session_factory = app.state.session_factory
    if not settings.mqtt_url:
        raise ConfigError("settings.mqtt_url is not set: the fleet server needs an MQTT broker")
    policy = DriftAlertPolicy(threshold=settings.drift_alert_threshold, repeat_s=settings.alert_repeat_s)
    webhook = settings.alert_webhook_url
    dispatcher = AlertDispatcher(session_factory, webhook) if webhook else None
    writers = settings.ingest_writers or (1 if settings.database_url.startswith("sqlite") else 2)
    bridge = MqttBridge(settings.mqtt_url, session_factory, client_id=resolve_mqtt_client_id(settings),
                        endpoint=settings.mqtt_endpoint(),
                        persistent_session=settings.mqtt_persistent_session,
                        drift_policy=policy, on_alert=dispatcher.notify if dispatcher else None,
                        budget=DeviceBudget(settings.device_message_rate, settings.device_message_burst),
                        ingest_queue=settings.ingest_queue, ingest_batch=settings.ingest_batch,
                        ingest_writers=writers, share_group=settings.mqtt_share_group).start()
    from fleet.director import director_for  # every stored desired state is signed with the fleet's key

    from fleet.leader import Leadership

    leadership = Leadership(app.state.engine)  # one controller among the replicas on this database
    controller = RolloutController(session_factory, bridge, bundle_url=_bundle_url_for(settings, getattr(app.state, "store", None)),
                                   signer=director_for(settings.data_dir), leadership=leadership)
    bridge.on_install_end = controller.notify
    from fleet.services.retention import RetentionJob

    retention = RetentionJob(session_factory, raw_days=settings.telemetry_retention_days,
                             rollup_days=settings.rollup_retention_days, interval_s=settings.maintenance_interval_s,
                             leadership=leadership)
    stop = threading.Event()
    threads = [controller.start_thread(stop, settings.controller_interval_s), retention.start_thread(stop)]
    if dispatcher is not None:
        threads.append(dispatcher.start_thread(stop))
    app.state.mqtt_bridge = bridge
    app.state.rollout_controller = controller
    app.state.alert_dispatcher = dispatcher
    app.state.retention = retention
    app.state.leadership = leadership
    try:
        yield
    finally:
        stop.set()
        controller.notify()  # wake it so it sees the stop now
        if dispatcher is not None:
            dispatcher.notify()  # wake it so it sees the stop now, not after its interval
        for thread in threads:
            await asyncio.to_thread(thread.join, 30)
        leadership.release()  # another replica takes the controller over now, not at its next try
        bridge.stop()


__all__ = ["DeviceBudget", "MALFORMED_REASONS", "MqttBridge", "REJECTED_REASONS", "check_broker", "lifespan_hook", "parse_mqtt_url", "redact_mqtt_url"]
