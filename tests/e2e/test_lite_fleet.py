"""The scale benchmark's device simulator (testbeds.lite.LiteFleet) against a real Mosquitto: every simulated
device holds its own connection, answers each desired state with `downloading` then `active` on the state's
bundle, ignores the retained replay of one it handled, and reports telemetry windows with unique ids; a burst
publishes prepared windows and every one reaches a subscriber."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import paho.mqtt.client as mqtt

from edgepack.protocol import desired_topic
from testbeds.fleet_harness import TopicListener, wait_for
from testbeds.lite import LiteFleet
from testbeds.mosquitto import MosquittoBroker

N = 300


class Recorder(TopicListener):
    """Every status and telemetry message the devices publish (and the retained desired states), in order."""

    def __init__(self, mqtt_url: str) -> None:
        self.messages: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        super().__init__(mqtt_url, "edgepack/v1/devices/+/+", qos=1, name="recorder")
        assert self.subscribed.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        if message.payload:
            with self.lock:
                self.messages.append((message.topic, json.loads(message.payload)))

    def of(self, kind: str) -> list[dict]:
        with self.lock:
            return [payload for topic, payload in self.messages if topic.endswith("/" + kind)]


def test_lite_devices_answer_desired_states_and_report_telemetry():
    with MosquittoBroker(secure=False) as broker:
        port = int(broker.url.rsplit(":", 1)[1])
        recorder = Recorder(broker.url)  # before the lite devices' sockets (select() in paho's loop)
        ids = [f"lite-{i:04d}" for i in range(N)]
        fleet = LiteFleet(broker.url, ids, bundle_id="a" * 64, telemetry_every_s=1.0).start(timeout_s=60)
        try:
            assert fleet.counts.connected == N
            sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sender")
            sender.connect("127.0.0.1", port)
            sender.loop_start()
            desired = {"seq": 1, "action": "install", "rollout_id": "r-1", "bundle": {"id": "b" * 64}}
            for device_id in ids:
                sender.publish(desired_topic(device_id), json.dumps(desired), qos=1, retain=True).wait_for_publish(10)
            wait_for(lambda: fleet.counts.acked == N, 30, what="every device to answer")
            # the answers are published; wait until the recorder has them all, not only until they were sent
            wait_for(lambda: sum(1 for s in recorder.of("status") if s.get("seq") == 1) >= 2 * N, 30,
                     what="the recorder to receive every answer")
            phases = Counter((s["device_id"], s["phase"]) for s in recorder.of("status") if s.get("seq") == 1)
            # at least once each (QoS 1 may deliver a copy twice); that each device acted once is counted above
            assert all(phases[(d, "downloading")] >= 1 and phases[(d, "active")] >= 1 for d in ids)
            assert set(fleet.current_bundles().values()) == {"b" * 64}
            # the same seq again (a retained replay) is not acted on twice
            sender.publish(desired_topic(ids[0]), json.dumps(desired), qos=1, retain=True).wait_for_publish(10)
            time.sleep(0.5)
            assert fleet.counts.acked == N
            sender.disconnect()
            sender.loop_stop()

            # once switched, every device reports on the new bundle; window ids never repeat
            wait_for(lambda: {w["device_id"] for w in recorder.of("telemetry") if w["bundle_id"] == "b" * 64} == set(ids),
                     30, what="a window on the new bundle from every device")
            windows = recorder.of("telemetry")
            assert len({(w["device_id"], w["window_id"]) for w in windows}) == len(windows)

            before = len(windows)
            fleet.burst({d: [json.dumps({"device_id": d, "burst": n}).encode() for n in range(5)] for d in ids[:50]})
            wait_for(lambda: sum(1 for w in recorder.of("telemetry") if "burst" in w) == 250, 30, what="the burst")
            assert len(recorder.of("telemetry")) >= before + 250
            assert fleet.disconnects == 0
        finally:
            fleet.stop()
            recorder.close()
