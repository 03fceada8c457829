"""The fleet CLI as an operator uses it, against a real `edgepack fleet serve` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx

from edgepack.signing import generate_keypair
from testbeds.fleet_harness import FleetProcess, build_release
from testbeds.mosquitto import MosquittoBroker, free_port
from tests.support import run_cli


def test_operator_workflow_push_enroll_rollout_pause_resume_abort(tmp_path):
    private, public = generate_keypair(tmp_path / "keys")
    (bundle,) = build_release(tmp_path, private, "2.0.0", ["jetson-orin-nano"])
    with MosquittoBroker(secure=True) as broker, FleetProcess.for_broker(broker, tmp_path, trusted_key=public) as fleet:
        env = {"EDGEPACK_FLEET_URL": fleet.url, "EDGEPACK_TOKEN": fleet.admin_token}
        pushed = run_cli("fleet", "push", str(bundle), "--stage", "staging", "--json", env=env)
        assert pushed.returncode == 0, pushed.stderr
        stored = json.loads(pushed.stdout)
        assert stored["stage"] == "staging" and stored["profile"] == "jetson-orin-nano"

        token = run_cli("devices", "enroll-token", "--labels", "site=lab", "--uses", "2", env=env)
        assert token.returncode == 0, token.stderr
        for device_id in ("cam-1", "cam-2"):
            enrolled = httpx.post(fleet.url + "/api/v1/devices/enroll", json={
                "device_id": device_id, "profile": "jetson-orin-nano", "labels": {}, "token": token.stdout.strip()})
            assert enrolled.status_code in (200, 201), enrolled.text
        listed = json.loads(run_cli("devices", "list", "--selector", "site=lab", "--json", env=env).stdout)
        assert sorted(d["id"] for d in listed) == ["cam-1", "cam-2"]

        started = run_cli("rollout", "start", stored["id"][:12], "--selector", "site=lab", "--waves", "50,100",
                          "--gate", "install_failure_ratio<=0.1", "--bake", "1m", "--json", env=env)
        assert started.returncode == 0, started.stderr
        rollout = json.loads(started.stdout)
        assert rollout["members_total"] == 2 and rollout["bake_s"] == 60
        for action, expected in (("pause", {"paused"}), ("resume", {"pending", "running"}), ("abort", {"aborted"})):
            done = run_cli("rollout", action, rollout["id"], "--json", env=env)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["status"] in expected
        status = run_cli("rollout", "status", rollout["id"], env=env)
        assert status.returncode == 0 and "aborted" in status.stdout and "cam-1" in status.stdout
        assert [r["id"] for r in json.loads(run_cli("rollout", "list", "--json", env=env).stdout)] == [rollout["id"]]
        assert run_cli("rollout", "list", env=env).returncode == 0

        # a wrong token is refused with one line and exit 2, a missing one too
        bad = run_cli("devices", "list", env={**env, "EDGEPACK_TOKEN": "not-a-token"})
        assert bad.returncode == 2 and "401" in bad.stderr and "Traceback" not in bad.stderr
        missing = run_cli("devices", "list", env={"EDGEPACK_FLEET_URL": fleet.url, "EDGEPACK_TOKEN": ""})
        assert missing.returncode == 2 and "EDGEPACK_TOKEN" in missing.stderr


def test_fleet_serve_without_urls_starts_an_embedded_broker_and_sqlite(tmp_path):
    port, mqtt_port = free_port(), free_port()
    env = {**os.environ, "EDGEPACK_ADMIN_TOKEN": "laptop-demo-token-0123456789"}
    env.pop("EDGEPACK_MQTT_URL", None)
    process = subprocess.Popen([sys.executable, "-m", "edgepack", "fleet", "serve", "--port", str(port), "--embedded-mqtt-port",
                                str(mqtt_port), "--data-dir", str(tmp_path / "data")], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("fleet serve did not come up")
        assert (tmp_path / "data" / "fleet.db").is_file()
        import paho.mqtt.client as mqtt

        # secure like production: an anonymous client is refused, the fleet's identity (password in the data
        # dir) may publish a desired state and read it back
        refused = []
        anonymous = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="anonymous-probe")
        anonymous.on_connect = lambda c, u, f, rc, p: refused.append(rc.is_failure)
        anonymous.connect("127.0.0.1", mqtt_port)
        anonymous.loop_start()
        deadline = time.monotonic() + 5
        while not refused and time.monotonic() < deadline:
            time.sleep(0.05)
        anonymous.loop_stop()
        assert refused == [True], "the embedded broker accepted an anonymous client"
        password = (tmp_path / "data" / "mqtt-fleet-password").read_text().strip()
        received = []
        subscribed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe")
        client.username_pw_set("edgepack-fleet", password)
        client.on_message = lambda c, u, m: received.append(m.payload)
        client.on_subscribe = lambda *args: subscribed.set()
        client.connect("127.0.0.1", mqtt_port)
        client.loop_start()
        client.subscribe("edgepack/v1/devices/probe/desired", qos=1)
        assert subscribed.wait(5), "the embedded broker did not acknowledge the subscription"  # SUBACK, then publish
        client.publish("edgepack/v1/devices/probe/desired", b"hello", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
        client.loop_stop()
        client.disconnect()
        assert received == [b"hello"]
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert "embedded MQTT broker" in output
