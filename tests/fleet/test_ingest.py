"""Batched ingestion (issue 12): device messages are stored in batches, one transaction each, on SQLite and
PostgreSQL; a window is stored once however often it arrives; a message is acknowledged to the broker only
once stored, so a QoS 1 redelivery after a lost connection lands on the window key, not in a second row."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import func, select

from edgepack.protocol import DeviceStatus, LatencySummary, Telemetry, encode, telemetry_topic
from fleet.ingest import Ingestor
from fleet.models import Alert, Device, TelemetryWindow
from fleet.mqtt_bridge import MqttBridge
from fleet.services.alerts import DriftAlertPolicy
from fleet.services.status import Inbound, store_batch, window_key
from tests.fleet.rollout_helpers import add_device
from tests.fleet.test_mqtt_bridge import DeviceClient, wait_for

AT = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def factory(migrated_factory):
    with migrated_factory() as session:
        for device_id in ("dev-1", "dev-2", "gone"):
            add_device(session, device_id, "rpi5")
        session.get(Device, "gone").revoked_at = AT
        session.commit()
    return migrated_factory


def _window(device_id: str, inferences: int, **fields) -> Telemetry:
    return Telemetry(device_id=device_id, window_s=10, inferences=inferences, errors=0, ts=1000.0 + inferences, **fields)


def _inbound(message) -> Inbound:
    kind = "status" if isinstance(message, DeviceStatus) else "telemetry"
    return Inbound(kind=kind, message=message, received_at=AT, payload=encode(message))


def _rows(factory) -> list[tuple[str, int]]:
    with factory() as session:
        return sorted(tuple(row) for row in session.execute(select(TelemetryWindow.device_id, TelemetryWindow.inferences)))


def test_a_batch_stores_statuses_and_windows_in_one_go_and_refuses_unknown_and_revoked_devices(factory):
    items = [_inbound(DeviceStatus(device_id="dev-1", phase="idle")), _inbound(_window("dev-1", 1)),
             _inbound(_window("dev-2", 2)), _inbound(_window("ghost", 3)), _inbound(_window("gone", 4)),
             _inbound(DeviceStatus(device_id="dev-2", state="offline"))]
    with factory() as session:
        outcome = store_batch(session, items)
    assert outcome.outcomes == ["status", "telemetry", "telemetry", "dropped:unknown_device", "dropped:revoked_device",
                                "status"]
    assert [w.inferences for w in outcome.windows] == [1, 2]
    assert _rows(factory) == [("dev-1", 1), ("dev-2", 2)]
    with factory() as session:
        assert session.get(Device, "dev-1").online and session.get(Device, "dev-1").last_seen is not None
        assert session.get(Device, "dev-2").online is False


def test_the_same_window_is_stored_once_within_a_batch_across_batches_and_by_its_window_id(factory):
    window = _window("dev-1", 7)
    with factory() as session:
        first = store_batch(session, [_inbound(window), _inbound(window)])
    with factory() as session:
        again = store_batch(session, [_inbound(window), _inbound(_window("dev-1", 8))])
    assert first.outcomes == ["telemetry", "duplicate"] and again.outcomes == ["duplicate", "telemetry"]
    # an agent's window id wins over the bytes: a re-sent window with another timestamp is still the same one
    with factory() as session:
        by_id = store_batch(session, [_inbound(_window("dev-2", 9, window_id="boot1-17")),
                                      _inbound(Telemetry(device_id="dev-2", window_id="boot1-17", window_s=10,
                                                         inferences=9, errors=0, ts=5.0))])
    assert by_id.outcomes == ["telemetry", "duplicate"]
    assert _rows(factory) == [("dev-1", 7), ("dev-1", 8), ("dev-2", 9)]
    assert window_key(window).startswith("sha256:") and window_key(_window("x", 1, window_id="w1")) == "w1"


def test_writers_store_a_thousand_messages_in_few_transactions_and_count_what_they_refuse(factory):
    stored: list[str] = []
    ingestor = Ingestor(factory, batch=200, writers=2, on_stored=lambda item, result: stored.append(result)).start()
    try:
        for i in range(1000):
            ingestor.submit(_inbound(_window("dev-1" if i % 2 else "dev-2", i)))
        ingestor.submit(_inbound(_window("ghost", 5000)))
        assert ingestor.drain(30)
    finally:
        ingestor.stop()
    assert stored.count("telemetry") == 1000 and stored.count("dropped:unknown_device") == 1
    assert ingestor.dropped == {"unknown_device": 1}
    assert 5 <= ingestor.batches < 1000 / 20  # batches, not a transaction per message
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(TelemetryWindow)) == 1000


def test_a_full_queue_holds_the_producer_back_instead_of_dropping(factory):
    gate = threading.Event()

    def slow_factory():
        gate.wait(10)
        return factory()

    ingestor = Ingestor(slow_factory, max_queue=5, batch=2, writers=1).start()
    try:
        producer = threading.Thread(target=lambda: [ingestor.submit(_inbound(_window("dev-1", i))) for i in range(20)])
        producer.start()
        wait_for(lambda: ingestor.waits > 0, what="the producer to find the queue full")
        assert producer.is_alive() and ingestor.depth >= 5  # waiting, not dropping
        gate.set()
        producer.join(30)
        assert ingestor.drain(30)
    finally:
        gate.set()
        ingestor.stop()
    assert ingestor.dropped == {} and len(_rows(factory)) == 20


def test_drift_checks_run_only_for_windows_that_can_raise_or_clear_an_alert(factory):
    calm = [_inbound(_window("dev-1", i, drift={"input": 0.01})) for i in range(50)]
    drifted = _inbound(_window("dev-2", 99, drift={"input": 0.9}))
    alerts: list[Alert] = []
    ingestor = Ingestor(factory, drift_policy=DriftAlertPolicy(threshold=0.25, repeat_s=3600),
                        on_alert=alerts.append).start()
    try:
        for item in [*calm, drifted]:
            ingestor.submit(item)
        assert ingestor.drain(30)
    finally:
        ingestor.stop()
    assert [a.device_id for a in alerts] == ["dev-2"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_qos1_redelivery_after_a_lost_connection_stores_one_row(mosquitto, factory):
    """The first server receives a window and loses its connection before its writer committed (so before
    the PUBACK); the broker hands the window again to the next server with the same session; one row."""
    gate = threading.Event()

    def held_factory():
        gate.wait(20)
        return factory()

    device = DeviceClient(mosquitto.url, "dev-1")
    first = MqttBridge(mosquitto.url, held_factory, client_id="fleet-redelivery", persistent_session=True).start()
    try:
        assert first.wait_ready(10)
        device.publish(telemetry_topic("dev-1"), encode(_window("dev-1", 42, latency_ms=LatencySummary(p95=3.0))))
        wait_for(lambda: first.ingestor.depth == 1,
                 what="the first server to receive the window")
        first._client.disconnect()  # gone before its writer stored the window: never acknowledged
        first._client.loop_stop()
        gate.set()  # its writer stores the window now; the PUBACK goes nowhere
        wait_for(lambda: first.ingestor.stored["telemetry"] == 1, what="the first server to store the window")
    finally:
        first.ingestor.stop()
    with MqttBridge(mosquitto.url, factory, client_id="fleet-redelivery", persistent_session=True) as second:
        wait_for(lambda: second.processed["duplicate"] == 1, what="the broker's redelivery of the window")
        assert second.processed["telemetry"] == 0
    device.close()
    assert _rows(factory) == [("dev-1", 42)]
