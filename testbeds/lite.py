"""Lightweight simulated devices: real MQTT connections and real protocol messages, no model.

Each `LiteDevice` logs in on its own connection (client id = device id), answers every desired state it
receives with the statuses an agent sends (`downloading`, then `active` on the state's bundle, or back on the
previous one for a `rollback`), and publishes telemetry windows with a unique `window_id` every
`telemetry_every_s` on the bundle it runs. It verifies nothing and downloads nothing: what it exercises is
the fleet's side — ingestion, gates on install status, the controller, the broker — at fleet sizes real
agents cannot reach on one machine. Every desired state and every window sent is recorded for the checks.
"""

from __future__ import annotations

import functools
import heapq
import json
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgepack.protocol import DeviceStatus, Telemetry, desired_topic, encode, status_topic, telemetry_topic


def publish_status(client: Any, device_id: str, seq: int, rollout_id: str | None, phase: str, current: str | None,
                   previous: str | None) -> None:
    """A device's status, as an agent publishes it: retained, QoS 1, stamped with the device's clock."""
    status = DeviceStatus(device_id=device_id, seq=seq, rollout_id=rollout_id, phase=phase, current_bundle=current,
                          previous_bundle=previous, profile=None, ts=time.time())
    client.publish(status_topic(device_id), encode(status), qos=1, retain=True)


def answer_desired(device: Any, desired: dict[str, Any], publish: Callable[[int, str | None, str], None]) -> bool:
    """What a lite device does with a desired state: nothing for a seq it handled (the retained replay after a
    reconnect), else `downloading`, the switch (to the state's bundle; back to the previous one for a
    rollback) and `active`. `device` holds handled_seq, current and previous; True when it acted."""
    seq = int(desired.get("seq") or 0)
    if seq <= device.handled_seq:
        return False
    device.handled_seq = seq
    rollout_id = desired.get("rollout_id")
    bundle = (desired.get("bundle") or {}).get("id")
    publish(seq, rollout_id, "downloading")
    if desired.get("action") == "rollback":
        device.current, device.previous = bundle or device.previous, device.current
    else:
        device.current, device.previous = bundle, device.current
    publish(seq, rollout_id, "active")
    return True


class LiteDevice:
    def __init__(self, device_id: str, mqtt_url: str, *, bundle_id: str | None = None,
                 telemetry_every_s: float | None = None, inferences: int = 100) -> None:
        import paho.mqtt.client as mqtt

        from edgepack.mqtt import MqttEndpoint

        self.device_id = device_id
        self.endpoint = MqttEndpoint.from_url(mqtt_url)
        self.current = bundle_id
        self.previous: str | None = None
        self.telemetry_every_s = telemetry_every_s
        self.inferences = inferences
        self.desired: list[dict[str, Any]] = []  # every desired state received, in order
        self.windows_sent = 0
        self.handled_seq = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        self.endpoint.apply(self.client)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def start(self) -> "LiteDevice":
        self.client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=30)
        self.client.loop_start()
        if self.telemetry_every_s:
            self._thread = threading.Thread(target=self._telemetry_loop, name=f"lite-{self.device_id}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------------ MQTT

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        client.subscribe(desired_topic(self.device_id), qos=1)
        self.connected.set()
        self._publish_status(self.handled_seq, None, "active" if self.current else "idle")

    def _on_message(self, client, userdata, message) -> None:
        if not message.payload:
            return
        try:
            desired = json.loads(message.payload)
        except ValueError:
            return
        with self._lock:
            self.desired.append(desired)
        answer_desired(self, desired, self._publish_status)

    def _publish_status(self, seq: int, rollout_id: str | None, phase: str) -> None:
        publish_status(self.client, self.device_id, seq, rollout_id, phase, self.current, self.previous)

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.telemetry_every_s):
            if not self.connected.is_set():
                continue
            self.windows_sent += 1
            window = Telemetry(device_id=self.device_id, window_id=f"{self.device_id}-{self.windows_sent}",
                               bundle_id=self.current, window_s=self.telemetry_every_s, inferences=self.inferences,
                               errors=0, latency_ms={"p50": 2.0, "p95": 3.0, "p99": 4.0}, ts=time.time())
            info = self.client.publish(telemetry_topic(self.device_id), encode(window), qos=1)
            try:
                info.wait_for_publish(10)
            except (RuntimeError, ValueError):
                pass


class _Sim:
    """One device of a LiteFleet: its client and what it saw (touched by the fleet's loop thread only)."""

    __slots__ = ("device_id", "client", "current", "previous", "handled_seq", "desired_at", "acked_at", "windows_sent",
                 "connected", "burst", "inflight")

    def __init__(self, device_id: str, client: Any, bundle_id: str | None) -> None:
        self.device_id = device_id
        self.client = client
        self.current = bundle_id
        self.previous: str | None = None
        self.handled_seq = 0
        self.desired_at: dict[int, float] = {}  # seq -> when the desired state arrived
        self.acked_at: dict[int, float] = {}  # seq -> when `active` for it was published
        self.windows_sent = 0
        self.connected = False
        self.burst: list[bytes] = []
        self.inflight = 0  # QoS 1 publishes not acknowledged yet


@dataclass
class FleetCounts:
    connected: int = 0
    desired: int = 0
    acked: int = 0
    windows_sent: int = 0
    pubacks: int = 0


class LiteFleet:
    """Thousands of lite devices in one thread: each device its own MQTT connection (its own client id and
    socket; paho's external-loop API on one selector), behaving as LiteDevice does — it answers every desired
    state with `downloading` then `active`, and publishes a telemetry window (QoS 1, a unique window id)
    every `telemetry_every_s` on the bundle it runs. `burst(payloads)` instead publishes prepared windows as
    fast as the broker takes them (the ingestion benchmark). A thread per device (LiteDevice) stops at a few
    hundred; this carries 10,000 on one core.

    `window(device_id, n, bundle_id)` builds a device's n-th window (bytes); by default a small valid one.
    """

    def __init__(self, mqtt_url: str, device_ids: Sequence[str], *, bundle_id: str | None = None,
                 telemetry_every_s: float | None = None,
                 window: Callable[[str, int, str | None], bytes] | None = None, connects_per_tick: int = 200,
                 max_inflight: int = 100) -> None:
        from edgepack.mqtt import MqttEndpoint

        self.endpoint = MqttEndpoint.from_url(mqtt_url)
        self.device_ids = list(device_ids)
        self.bundle_id = bundle_id
        self.telemetry_every_s = telemetry_every_s
        self.window = window or self._default_window
        self.connects_per_tick = connects_per_tick
        self.max_inflight = max_inflight
        self.counts = FleetCounts()
        self.sims = [_Sim(device_id, None, bundle_id) for device_id in self.device_ids]
        self.disconnects = 0
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._commands: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._due: list[tuple[float, int]] = []  # (when, sim index): next telemetry window
        self._bursting: set[int] = set()
        self.all_connected = threading.Event()

    # ------------------------------------------------------------------ control (any thread)

    def start(self, timeout_s: float = 300.0) -> "LiteFleet":
        self._thread = threading.Thread(target=self._run, name="lite-fleet", daemon=True)
        self._thread.start()
        if not self.all_connected.wait(timeout_s):
            raise TimeoutError(f"only {self.counts.connected} of {len(self.device_ids)} lite devices connected "
                               f"in {timeout_s:.0f} s")
        return self

    def burst(self, payloads: dict[str, list[bytes]]) -> None:
        """Have each device publish its prepared windows now, as fast as the broker acknowledges them."""
        def command() -> None:
            for index, sim in enumerate(self.sims):
                if payloads.get(sim.device_id):
                    sim.burst.extend(payloads[sim.device_id])
                    self._bursting.add(index)
        self._call(command)

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(60)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def desired_by_device(self) -> dict[str, dict[int, float]]:
        with self._lock:
            return {sim.device_id: dict(sim.desired_at) for sim in self.sims}

    def acked_by_device(self) -> dict[str, dict[int, float]]:
        with self._lock:
            return {sim.device_id: dict(sim.acked_at) for sim in self.sims}

    def current_bundles(self) -> dict[str, str | None]:
        with self._lock:
            return {sim.device_id: sim.current for sim in self.sims}

    def _call(self, command: Callable[[], None]) -> None:
        with self._lock:
            self._commands.append(command)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    # ------------------------------------------------------------------ the loop thread

    def _default_window(self, device_id: str, n: int, bundle_id: str | None) -> bytes:
        return encode(Telemetry(device_id=device_id, window_id=f"{device_id}-{n}", bundle_id=bundle_id,
                                window_s=self.telemetry_every_s or 10.0, inferences=100, errors=0,
                                latency_ms={"p50": 2.0, "p95": 3.0, "p99": 4.0}, ts=time.time()))

    def _client(self, index: int, device_id: str) -> Any:
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, userdata=index)
        self.endpoint.apply(client)
        client.max_inflight_messages_set(self.max_inflight)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    def _on_socket_open(self, client, index, sock) -> None:
        self._selector.register(sock, selectors.EVENT_READ, index)

    def _on_socket_close(self, client, index, sock) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _on_register_write(self, client, index, sock) -> None:
        try:
            self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, index)
        except (KeyError, ValueError):
            pass

    def _on_unregister_write(self, client, index, sock) -> None:
        try:
            self._selector.modify(sock, selectors.EVENT_READ, index)
        except (KeyError, ValueError):
            pass

    def _on_connect(self, client, index, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        sim = self.sims[index]
        client.subscribe(desired_topic(sim.device_id), qos=1)
        if not sim.connected:
            sim.connected = True
            self.counts.connected += 1
            if self.counts.connected == len(self.device_ids):
                self.all_connected.set()
        self._status(sim, sim.handled_seq, None, "active" if sim.current else "idle")

    def _on_publish(self, client, index, mid, reason_code, properties) -> None:
        self.counts.pubacks += 1
        self.sims[index].inflight -= 1

    def _on_disconnect(self, client, index, flags, reason_code, properties) -> None:
        if not self._stop.is_set():
            self.disconnects += 1

    def _on_message(self, client, index, message) -> None:
        if not message.payload:
            return
        try:
            desired = json.loads(message.payload)
            seq = int(desired.get("seq") or 0)
        except (ValueError, TypeError, AttributeError):
            return
        sim = self.sims[index]
        with self._lock:
            sim.desired_at.setdefault(seq, time.time())
        if not answer_desired(sim, desired, functools.partial(self._status, sim)):
            return
        self.counts.desired += 1
        with self._lock:
            sim.acked_at[seq] = time.time()
        self.counts.acked += 1

    def _status(self, sim: _Sim, seq: int, rollout_id: str | None, phase: str) -> None:
        publish_status(sim.client, sim.device_id, seq, rollout_id, phase, sim.current, sim.previous)

    def _publish_window(self, sim: _Sim, payload: bytes | None = None) -> None:
        if payload is None:
            sim.windows_sent += 1
            payload = self.window(sim.device_id, sim.windows_sent, sim.current)
        sim.inflight += 1
        sim.client.publish(telemetry_topic(sim.device_id), payload, qos=1)
        self.counts.windows_sent += 1

    def _run(self) -> None:
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        pending = list(enumerate(self.device_ids))
        pending.reverse()
        last_misc = time.monotonic()
        try:
            while not self._stop.is_set():
                for _ in range(min(self.connects_per_tick, len(pending))):
                    index, device_id = pending.pop()
                    sim = self.sims[index]
                    sim.client = self._client(index, device_id)
                    try:
                        sim.client.connect(self.endpoint.host, self.endpoint.port, keepalive=60)
                    except OSError:
                        pending.insert(0, (index, device_id))  # the broker's backlog was full: again later
                        sim.client = None
                        break
                    if self.telemetry_every_s:
                        first = time.monotonic() + self.telemetry_every_s * (index / max(1, len(self.device_ids)))
                        heapq.heappush(self._due, (first, index))
                for key, mask in self._selector.select(timeout=0.02):
                    if key.data is None:
                        try:
                            self._wake_r.recv(4096)
                        except BlockingIOError:
                            pass
                        continue
                    client = self.sims[key.data].client
                    if mask & selectors.EVENT_READ:
                        client.loop_read()
                    if mask & selectors.EVENT_WRITE:
                        client.loop_write()
                with self._lock:
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    _, index = heapq.heappop(self._due)
                    sim = self.sims[index]
                    if sim.connected:
                        self._publish_window(sim)
                    heapq.heappush(self._due, (now + self.telemetry_every_s, index))
                for index in list(self._bursting):
                    sim = self.sims[index]
                    # keep each device's queue at its in-flight window: paho holds the rest unsent anyway
                    room = self.max_inflight - sim.inflight
                    while sim.burst and room > 0:
                        self._publish_window(sim, sim.burst.pop(0))
                        room -= 1
                    if not sim.burst:
                        self._bursting.discard(index)
                if now - last_misc >= 1.0:  # keepalive pings
                    last_misc = now
                    for sim in self.sims:
                        if sim.client is not None:
                            sim.client.loop_misc()
        finally:
            for sim in self.sims:
                if sim.client is None:
                    continue
                try:
                    sim.client.disconnect()
                    sim.client.loop_write()
                except Exception:  # a connection already gone: nothing to say goodbye on
                    pass
                sock = sim.client.socket()
                if sock is not None:
                    self._on_socket_close(sim.client, None, sock)
                    sock.close()


__all__ = ["FleetCounts", "LiteDevice", "LiteFleet", "answer_desired", "publish_status"]
