"""Lightweight simulated devices: real MQTT connections and real protocol messages, no model.

Each `LiteDevice` logs in on its own connection (client id = device id), answers every desired state it
receives with the statuses an agent sends (`downloading`, then `active` on the state's bundle, or back on the
previous one for a `rollback`), and publishes telemetry windows with a unique `window_id` every
`telemetry_every_s` on the bundle it runs. It verifies nothing and downloads nothing: what it exercises is
the fleet's side — ingestion, gates on install status, the controller, the broker — at fleet sizes real
agents cannot reach on one machine. Every desired state and every window sent is recorded for the checks.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from edgepack.protocol import DeviceStatus, Telemetry, desired_topic, encode, status_topic, telemetry_topic


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
            seq = int(desired.get("seq") or 0)
            if seq <= self.handled_seq:
                return  # the retained replay after a reconnect
            self.handled_seq = seq
        rollout_id = desired.get("rollout_id")
        bundle = (desired.get("bundle") or {}).get("id")
        self._publish_status(seq, rollout_id, "downloading")
        if desired.get("action") == "rollback":
            self.current, self.previous = bundle or self.previous, self.current
        else:
            self.current, self.previous = bundle, self.current
        self._publish_status(seq, rollout_id, "active")

    def _publish_status(self, seq: int, rollout_id: str | None, phase: str) -> None:
        status = DeviceStatus(device_id=self.device_id, seq=seq, rollout_id=rollout_id, phase=phase,
                              current_bundle=self.current, previous_bundle=self.previous, profile=None, ts=time.time())
        self.client.publish(status_topic(self.device_id), encode(status), qos=1, retain=True)

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


__all__ = ["LiteDevice"]
