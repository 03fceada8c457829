"""Issue 10 acceptance: `edgepack devices revoke` on a connected real agent, on the secure path (Mosquitto with
the dynamic security plugin managed by `fleet serve --mqtt-dynsec`). Within 5 s the agent's MQTT session is
closed; a reconnect and a download with its old credential fail; the rest of the fleet keeps its sessions and
still takes a rollout."""

from __future__ import annotations

import threading

import httpx
import paho.mqtt.client as mqtt

from edgepack.signing import generate_keypair
from testbeds.fleet_harness import FleetProcess, agent_configs, build_release, wait_for
from testbeds.mosquitto import MosquittoBroker
from tests.support import run_cli

PROFILE = "x86-avx2"


def _broker_accepts(port: int, username: str, password: str) -> bool:
    """Does the broker accept this identity? (CONNACK within 5 s)"""
    answers: list[bool] = []
    answered = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        answers.append(not reason_code.is_failure)
        answered.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{username}", protocol=mqtt.MQTTv311)
    client.username_pw_set(username, password)
    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert answered.wait(5), "the broker did not answer the CONNECT"
    finally:
        client.disconnect()
        client.loop_stop()
    return answers[0]


def test_revoking_a_connected_agent_closes_its_session_and_its_credential_while_the_others_carry_on(tmp_path):
    private, public = generate_keypair(tmp_path / "keys")
    (bundle,) = build_release(tmp_path, private, "1.0.0", [PROFILE])
    with MosquittoBroker(secure=True) as broker, FleetProcess.for_broker(broker, tmp_path, trusted_key=public) as fleet:
        client = fleet.client()
        bundle_id = client.upload(bundle)["id"]
        token = client.request("POST", "/devices/enrollment-tokens", json={"uses": 3, "labels": {"site": "lab"}})["token"]
        secure = {"require_signed_desired": True}
        stays = agent_configs(tmp_path, 2, [PROFILE], fleet.url, broker.url, token, public, labels={"group": "stays"}, extra=secure)
        (victim,) = agent_configs(tmp_path, 1, [PROFILE], fleet.url, broker.url, token, public, labels={"group": "revoked"},
                                  extra=secure, start=2)
        agents = [*stays, victim]
        try:
            for agent in agents:
                agent.start()
            wait_for(lambda: len(client.request("GET", "/devices")) == 3, 60, what="three enrollments")
            wait_for(lambda: all(a.agent.is_connected() for a in agents), 30, 0.1, what="every agent's MQTT session")
            credential = (tmp_path / "agents" / victim.device_id / "credential").read_text().strip()
            assert _broker_accepts(broker.port, victim.device_id, credential)  # the credential worked until now

            revoked = run_cli("devices", "revoke", victim.device_id,
                              env={"EDGEPACK_FLEET_URL": fleet.url, "EDGEPACK_TOKEN": fleet.admin_token})
            assert revoked.returncode == 0, revoked.stderr
            wait_for(lambda: not victim.agent.is_connected(), 5, 0.05, what="the revoked agent's session to be closed")

            # its old credential opens neither plane: the broker refuses the identity, the API the download
            assert not _broker_accepts(broker.port, victim.device_id, credential)
            download = httpx.get(f"{fleet.url}/api/v1/bundles/{bundle_id}/download",
                                 headers={"Authorization": f"Bearer {credential}"}, timeout=10)
            assert download.status_code == 401, download.text
            assert client.request("GET", f"/devices/{victim.device_id}")["revoked_at"]

            # the others keep their sessions and take a rollout; the revoked agent's own reconnects keep failing
            assert all(a.agent.is_connected() for a in stays)
            started = client.request("POST", "/rollouts", json={
                "bundle_id": bundle_id, "selector": {"group": "stays"}, "waves": [100], "gates": ["install_failure_ratio<=0"],
                "bake_s": 0, "min_reports": 1, "install_timeout_s": 120})
            assert started["members_total"] == 2
            final = wait_for(lambda: (r := client.request("GET", f"/rollouts/{started['id']}"))["status"]
                             in ("succeeded", "rolled_back", "aborted", "failed") and r, 120, what="the rollout to the others")
            assert final["status"] == "succeeded", final["decisions"]
            assert [a.active_version() for a in stays] == [bundle_id, bundle_id]
            assert not victim.agent.is_connected() and victim.active_version() is None
        finally:
            for agent in agents:
                agent.stop()
