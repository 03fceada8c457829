"""Issue 10 acceptance, the broker side: nobody can speak for a device it is not, on a real Mosquitto run
with the production settings (dynamic security plugin, no anonymous clients) and on the embedded broker.

A real fleet server (uvicorn, SQLite) enrolls devices A and B over HTTP, which creates their MQTT
identities in the broker; the fleet's bridge consumes device topics as the fleet identity. Then an MQTT
client with no credential and one holding A's credential try everything they should not: connect,
subscribe to `edgepack/#`, publish B's status and telemetry, publish desired states for A and B. Every
attempt is refused by the broker (CONNACK, SUBACK failure, PUBLISH dropped); no forged status or telemetry
is stored, no forged desired state reaches a device. Revoking A closes its session within 5 s, and its
old credential fails on MQTT and HTTP while B keeps working.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import func, select

from edgepack.mqtt import MqttEndpoint
from edgepack.protocol import SCHEMA_VERSION, desired_topic, status_topic, telemetry_topic
from fleet import metrics
from fleet.broker.dynsec import DynsecIdentities
from fleet.embedded_broker import EmbeddedBroker
from fleet.models import Device, TelemetryWindow
from fleet.mqtt_bridge import DeviceBudget, MqttBridge
from testbeds.mosquitto import MosquittoBroker, free_port

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass
class Client:
    """A paho client recording what the broker answered and what it delivered."""

    client_id: str
    username: str | None = None
    password: str | None = None
    connack: list[str] = field(default_factory=list)
    subacks: list[list[bool]] = field(default_factory=list)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def connect(self, port: int) -> "Client":
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311)
        if self.username:
            client.username_pw_set(self.username, self.password)
        client.on_connect = lambda c, u, f, rc, p: self.connack.append(str(rc))
        client.on_subscribe = lambda c, u, m, rcs, p: self.subacks.append([not r.is_failure for r in rcs])
        client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        client.on_disconnect = lambda c, u, f, rc, p: self.disconnected.set()
        client.reconnect_delay_set(1, 1)
        self.paho = client
        client.connect_async("127.0.0.1", port)
        client.loop_start()
        wait_for(lambda: self.connack, what=f"{self.client_id}'s CONNACK")
        return self

    @property
    def accepted(self) -> bool:
        return self.connack[:1] == ["Success"]

    def subscribe(self, topic: str) -> bool:
        count = len(self.subacks)
        self.paho.subscribe(topic, qos=1)
        wait_for(lambda: len(self.subacks) > count, what=f"SUBACK for {topic}")
        return all(self.subacks[-1])

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.paho.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def _status(device_id: str, phase: str = "idle") -> bytes:
    return json.dumps({"schema_version": SCHEMA_VERSION, "device_id": device_id, "phase": phase,
                       "state": "online", "ts": time.time()}).encode()


def _telemetry(device_id: str) -> bytes:
    """A window of a flooding device; each one distinct (its id), so none is stored as a redelivery."""
    return json.dumps({"schema_version": SCHEMA_VERSION, "device_id": device_id, "bundle_id": None,
                       "window_id": uuid.uuid4().hex, "window_s": 10.0, "inferences": 1000, "errors": 900,
                       "latency_ms": {"p50": 500.0, "p95": 990.0, "p99": 999.0}}).encode()


def _desired(device_id: str) -> bytes:
    return json.dumps({"schema_version": SCHEMA_VERSION, "seq": 10**9, "device_id": device_id, "action": "install",
                       "bundle_id": "0" * 64, "bundle_url": "http://attacker.invalid/b.edgepack"}).encode()


@dataclass
class Plane:
    port: int
    fleet_url: str
    identities: object


@contextmanager
def _mosquitto() -> Iterator[Plane]:
    with MosquittoBroker(secure=True) as broker:
        identities = DynsecIdentities(MqttEndpoint.from_url(broker.fleet_url))
        try:
            yield Plane(broker.port, broker.fleet_url, identities)
        finally:
            identities.close()


@contextmanager
def _embedded() -> Iterator[Plane]:
    broker = EmbeddedBroker(port=free_port()).start()
    try:
        yield Plane(broker.port, broker.fleet_url, broker)
    finally:
        broker.stop()


@pytest.fixture(params=["mosquitto", "embedded"])
def plane(request, start_fleet):
    """(fleet, plane, bridge): a fleet server managing the broker's identities, and its bridge on it."""
    with (_mosquitto() if request.param == "mosquitto" else _embedded()) as broker:
        fleet = start_fleet(mqtt_url=broker.fleet_url)
        if isinstance(broker.identities, EmbeddedBroker):
            broker.identities.use_fleet_database(fleet.app.state.session_factory)
        fleet.app.state.device_identities = broker.identities
        bridge = MqttBridge(broker.fleet_url, fleet.app.state.session_factory, client_id="fleet-bridge",
                            budget=DeviceBudget(rate=1000, burst=1000)).start()
        assert bridge.wait_ready(10), "the fleet identity could not connect and subscribe"
        try:
            yield fleet, broker, bridge
        finally:
            bridge.stop()


def _count(session, model, device_id: str) -> int:
    return session.scalar(select(func.count()).select_from(model).where(model.device_id == device_id))


def test_no_credential_and_another_devices_credential_are_refused(plane) -> None:
    fleet, broker, bridge = plane
    cred_a, cred_b = fleet.enroll("dev-a"), fleet.enroll("dev-b")
    device_b = Client("agent-b", "dev-b", cred_b).connect(broker.port)
    assert device_b.accepted and device_b.subscribe(desired_topic("dev-b"))

    anonymous = Client("anon").connect(broker.port)
    assert not anonymous.accepted, anonymous.connack
    wrong = Client("guess", "dev-b", "epd_guessed").connect(broker.port)
    assert not wrong.accepted, wrong.connack
    fleet_name = Client("pretender", "edgepack-fleet", cred_a).connect(broker.port)
    assert not fleet_name.accepted, fleet_name.connack

    attacker = Client("agent-a", "dev-a", cred_a).connect(broker.port)
    assert attacker.accepted
    assert not attacker.subscribe("edgepack/#")
    assert not attacker.subscribe(desired_topic("dev-b"))
    assert not attacker.subscribe("edgepack/v1/devices/+/status")
    assert attacker.subscribe(desired_topic("dev-a"))  # its own, and only that
    attacker.publish(status_topic("dev-b"), _status("dev-b", phase="failed"))
    attacker.publish(telemetry_topic("dev-b"), _telemetry("dev-b"))
    attacker.publish(desired_topic("dev-b"), _desired("dev-b"), retain=True)
    attacker.publish(desired_topic("dev-a"), _desired("dev-a"), retain=True)
    attacker.publish(status_topic("dev-a"), _status("dev-b"))  # its own topic, B's name: the fleet drops it
    # a marker on the same connection: once the fleet has it, anything published before it was seen or dropped
    attacker.publish(status_topic("dev-a"), _status("dev-a", phase="active"))
    wait_for(lambda: bridge.processed["status"] >= 1, what="A's own status")

    time.sleep(0.2)  # let a forged desired state that got through arrive (none may)
    assert device_b.messages == [] and attacker.messages == []
    assert bridge.processed == {"status": 1}
    assert bridge.malformed["device_mismatch"] == 1
    with fleet.app.state.session_factory() as session:
        b = session.get(Device, "dev-b")
        assert (b.phase, b.last_status, b.current_bundle_id, b.desired) == ("idle", None, None, None)
        assert _count(session, TelemetryWindow, "dev-b") == 0
        a = session.get(Device, "dev-a")
        assert a.phase == "active" and a.current_bundle_id is None
    # a subscriber arriving later gets no retained forged state either
    late_b = Client("agent-b-late", "dev-b", cred_b).connect(broker.port)
    assert late_b.subscribe(desired_topic("dev-b"))
    time.sleep(0.2)
    assert late_b.messages == []
    for client in (device_b, attacker, late_b):
        client.close()


def test_revoke_closes_the_session_and_the_old_credential_fails_on_both_planes(plane) -> None:
    fleet, broker, bridge = plane
    cred_a, cred_b = fleet.enroll("dev-a"), fleet.enroll("dev-b")
    device_a = Client("agent-a", "dev-a", cred_a).connect(broker.port)
    device_b = Client("agent-b", "dev-b", cred_b).connect(broker.port)
    assert device_a.accepted and device_b.accepted

    revoked = fleet.admin.post("/api/v1/devices/dev-a/revoke")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"]
    assert device_a.disconnected.wait(5), "the revoked device's MQTT session is still open"
    device_a.close()
    again = Client("agent-a-again", "dev-a", cred_a).connect(broker.port)
    assert not again.accepted, again.connack
    again.close()
    http = fleet.client(cred_a).post("/api/v1/devices/dev-a/status", content=_status("dev-a"),
                                     headers={"Content-Type": "application/json"})
    assert http.status_code == 401

    # the rest of the fleet is unaffected
    assert not device_b.disconnected.is_set()
    device_b.publish(status_topic("dev-b"), _status("dev-b", phase="active"))
    wait_for(lambda: bridge.processed["status"] >= 1, what="B's status after A's revocation")
    # a revoked device re-enrolls only with a token created after its revocation
    fleet.enroll("dev-a")
    device_b.close()


def test_a_rotated_credential_replaces_the_old_one_on_both_planes(plane) -> None:
    fleet, broker, bridge = plane
    old = fleet.enroll("dev-a")
    device_a = Client("agent-a", "dev-a", old).connect(broker.port)
    rotated = fleet.admin.post("/api/v1/devices/dev-a/rotate-credential")
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["credential"]
    assert device_a.disconnected.wait(5), "a session opened with the old credential is still open"
    device_a.close()
    assert not Client("old", "dev-a", old).connect(broker.port).accepted
    fresh = Client("new", "dev-a", new).connect(broker.port)
    assert fresh.accepted and fresh.subscribe(desired_topic("dev-a"))
    assert fleet.client(old).get("/api/v1/bundles/" + "0" * 64 + "/download").status_code == 401
    fresh.close()


def test_a_flooding_device_is_ignored_past_its_budget_and_the_others_are_not(start_fleet) -> None:
    """The bridge's own budget (no broker needed to count): one device far over it, another under it."""
    fleet = start_fleet()
    fleet.enroll("dev-a")
    fleet.enroll("dev-b")
    now = [0.0]
    bridge = MqttBridge("mqtt://127.0.0.1:1", fleet.app.state.session_factory,
                        budget=DeviceBudget(rate=1.0, burst=5, clock=lambda: now[0]))
    before = metrics.REGISTRY.get_sample_value("edgepack_mqtt_throttled_total", {"reason": "telemetry"}) or 0.0
    results = [bridge.handle_message(telemetry_topic("dev-a"), _telemetry("dev-a")) for _ in range(50)]
    assert results.count("telemetry") == 5 and results.count("throttled") == 45
    assert bridge.handle_message(telemetry_topic("dev-b"), _telemetry("dev-b")) == "telemetry"
    now[0] += 2.0  # two seconds later A has two messages of budget again
    assert [bridge.handle_message(telemetry_topic("dev-a"), _telemetry("dev-a")) for _ in range(3)] == \
        ["telemetry", "telemetry", "throttled"]
    after = metrics.REGISTRY.get_sample_value("edgepack_mqtt_throttled_total", {"reason": "telemetry"})
    assert after - before == 46
    assert fleet.admin.get("/metrics").text.count("edgepack_mqtt_throttled_total{") >= 1
    with fleet.app.state.session_factory() as session:
        assert _count(session, TelemetryWindow, "dev-a") == 7 and _count(session, TelemetryWindow, "dev-b") == 1
