"""Killing the fleet server while devices publish telemetry loses no window (issue 9, "fleet settings that exist").

A real Mosquitto, a real `edgepack fleet serve` process (SQLite) and ten devices publishing telemetry windows
with QoS 1 from their own MQTT connections. The server is SIGKILLed mid-stream, the devices keep publishing
through the outage, the server is started again on the same data folder, and every window any device
published — before, during and after the outage — must be in the database. The broker holds the server's
persistent session (its client id is kept in the data folder) and queues what arrives while it is down.
On the secure path: the broker runs the dynamic security plugin, the fleet logs in as its own identity and
creates each device's at enrollment, the devices log in with their credential.

A window carries no unique id yet (issue 12), so each device numbers its windows (`inferences` = sequence
number) and the test matches rows to windows per device. Redelivery may store a window twice (the server
committed it, then died before its PUBACK left): duplicates are counted and reported, and may only be of
windows published before the kill.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
from sqlalchemy import create_engine, select

from edgepack.protocol import Telemetry, encode, telemetry_topic
from edgepack.signing import generate_keypair
from fleet.models import TelemetryWindow
from fleet.mqtt_bridge import parse_mqtt_url
from testbeds.fleet_harness import FleetProcess, wait_for
from testbeds.mosquitto import MosquittoBroker

DEVICES = 10
INTERVAL_S = 0.1  # each device publishes a window this often: 100 windows/s over the fleet
WARMUP = -1  # the sequence number of the windows that only wait for the server's first subscription


class Device:
    """One device's MQTT connection, publishing numbered telemetry windows with QoS 1."""

    def __init__(self, mqtt_url: str, device_id: str, credential: str) -> None:
        endpoint = parse_mqtt_url(mqtt_url)
        self.device_id = device_id
        self.published: list[tuple[int, float]] = []  # (sequence number, monotonic time the broker acknowledged it)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.username_pw_set(device_id, credential)  # its MQTT identity: id and enrollment credential
        self.client.connect(endpoint["host"], endpoint["port"])
        self.client.loop_start()

    def publish(self, seq: int) -> None:
        window = Telemetry(device_id=self.device_id, window_s=INTERVAL_S, inferences=max(seq, 0), errors=0, ts=float(seq))
        info = self.client.publish(telemetry_topic(self.device_id), encode(window), qos=1)
        info.wait_for_publish(10)
        assert info.is_published(), f"{self.device_id}: the broker did not acknowledge window {seq}"
        if seq != WARMUP:
            self.published.append((seq, time.monotonic()))

    def run(self, stop: threading.Event) -> None:
        seq = 0
        while not stop.is_set():
            self.publish(seq)
            seq += 1
            stop.wait(INTERVAL_S)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def stored_windows(db_path: Path) -> dict[str, Counter[int]]:
    """Per device, how many rows hold each window (by its sequence number; warm-up windows left out)."""
    engine = create_engine(f"sqlite:///{db_path}")
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(TelemetryWindow.device_id, TelemetryWindow.payload)).all()
    finally:
        engine.dispose()
    stored: dict[str, Counter[int]] = {}
    for device_id, payload in rows:
        seq = int(payload["ts"])
        if seq != WARMUP:
            stored.setdefault(device_id, Counter())[seq] += 1
    return stored


def test_killing_the_fleet_while_devices_publish_loses_no_telemetry_window(tmp_path, record_property):
    with MosquittoBroker(secure=True) as broker:
        _kill_and_restart(tmp_path, broker, record_property)


def _kill_and_restart(tmp_path: Path, mosquitto: MosquittoBroker, record_property) -> None:
    _, public = generate_keypair(tmp_path / "keys")
    fleet = FleetProcess.for_broker(mosquitto, tmp_path, trusted_key=public, extra_args=["--controller-interval-s", "5"])
    db_path = tmp_path / "fleet-data" / "fleet.db"
    devices: list[Device] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        fleet.start()
        token = fleet.client().request("POST", "/devices/enrollment-tokens", json={"uses": DEVICES})["token"]
        for index in range(DEVICES):
            device_id = f"tele-{index:02d}"
            enrolled = httpx.post(fleet.url + "/api/v1/devices/enroll",
                                  json={"device_id": device_id, "profile": "rpi5", "token": token}, timeout=10)
            assert enrolled.status_code == 201, enrolled.text
            devices.append(Device(mosquitto.url, device_id, enrolled.json()["credential"]))
        # The server's session exists once it has subscribed: from then on the broker keeps what it misses.
        wait_for(lambda: devices[0].publish(WARMUP) or _any_row(db_path), 60, 0.2, "the server's first telemetry window")
        client_id = (tmp_path / "fleet-data" / "mqtt-client-id").read_text().strip()

        threads = [threading.Thread(target=device.run, args=(stop,), daemon=True) for device in devices]
        for thread in threads:
            thread.start()
        wait_for(lambda: _each_device_stored(db_path, 5), 60, 0.2, "five windows stored per device")
        fleet.kill()
        killed_at = time.monotonic()
        # the devices keep publishing through the outage: at least ten windows each while nothing consumes them
        wait_for(lambda: all(_published_since(device, killed_at) >= 10 for device in devices), 60, 0.1,
                 "ten windows per device published during the outage")
        fleet.start()
        back_at = time.monotonic()
        wait_for(lambda: all(_published_since(device, back_at) >= 5 for device in devices), 60, 0.1,
                 "five windows per device after the restart")
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        published = {device.device_id: [seq for seq, _ in device.published] for device in devices}
        try:
            wait_for(lambda: _all_stored(db_path, published), 120, 0.5, "every published window to be stored")
        except TimeoutError:
            pass  # the assertions below say which windows are missing
        stored = stored_windows(db_path)
        assert (tmp_path / "fleet-data" / "mqtt-client-id").read_text().strip() == client_id
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for device in devices:
            device.close()
        fleet.stop()

    during = {d.device_id: sum(killed_at <= at < back_at for _, at in d.published) for d in devices}
    missing = {device_id: sorted(set(seqs) - set(stored.get(device_id, {}))) for device_id, seqs in published.items()}
    duplicates = {device_id: sorted(seq for seq, n in counts.items() if n > 1) for device_id, counts in stored.items()}
    unknown = {device_id: sorted(set(counts) - set(published[device_id])) for device_id, counts in stored.items()}
    # (1 s of slack: the broker may hand a window to the server before the device hears its PUBACK)
    published_before_kill = {d.device_id: {seq for seq, at in d.published if at < killed_at + 1.0} for d in devices}
    summary = (f"published {sum(map(len, published.values()))} windows ({sum(during.values())} during the outage), "
               f"stored {sum(sum(c.values()) for c in stored.values())} rows, "
               f"duplicates {sum(map(len, duplicates.values()))}: {({k: v for k, v in duplicates.items() if v})}")
    print(summary)
    record_property("fleet_restart", summary)

    assert all(n >= 10 for n in during.values()), during
    assert {k: v for k, v in missing.items() if v} == {}, summary
    assert {k: v for k, v in unknown.items() if v} == {}
    # a duplicate is a window the server stored and died before acknowledging: one from before the kill
    assert all(set(seqs) <= published_before_kill[device_id] for device_id, seqs in duplicates.items()), summary


def _any_row(db_path: Path) -> bool:
    engine = create_engine(f"sqlite:///{db_path}")
    try:
        with engine.connect() as connection:
            return connection.execute(select(TelemetryWindow.id).limit(1)).first() is not None
    finally:
        engine.dispose()


def _each_device_stored(db_path: Path, count: int) -> bool:
    stored = stored_windows(db_path)
    return len(stored) == DEVICES and all(len(counts) >= count for counts in stored.values())


def _published_since(device: Device, since: float) -> int:
    return sum(at >= since for _, at in list(device.published))


def _all_stored(db_path: Path, published: dict[str, list[int]]) -> bool:
    stored = stored_windows(db_path)
    return all(set(seqs) <= set(stored.get(device_id, {})) for device_id, seqs in published.items())
