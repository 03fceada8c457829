"""Issue 10 item 3, end to end: a real Mosquitto, `edgepack fleet serve` and a real agent. The agent pins the
fleet key at enrollment, refuses and reports forged desired states (unsigned with a huge seq, signed by
another key) and a fleet-signed downgrade that is not a rollback, and the fleet's next rollouts still reach it;
then the fleet key is rotated under it (the current key announces the next, which then signs the next rollout)."""

from __future__ import annotations

import json
import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepack.protocol import BundleRef, DesiredState, desired_topic, encode
from edgepack.signing import generate_keypair, load_private_key
from fleet.director import FleetDirector, begin_rotation, finish_rotation
from testbeds.fleet_harness import FleetProcess, agent_configs, build_release, wait_for
from testbeds.mosquitto import MosquittoBroker

PROFILE = "x86-avx2"
HUGE_SEQ = 10**9


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    private, public = generate_keypair(root / "keys")
    return {"pub": public, **{v: build_release(root, private, f"{v}.0.0", [PROFILE])[0] for v in ("1", "2", "3", "4")}}


def _publish(broker_url: str, device_id: str, payload: bytes) -> None:
    """A client that is not the fleet puts a retained desired state on the device's topic."""
    import paho.mqtt.client as mqtt

    from edgepack.mqtt import MqttEndpoint

    endpoint = MqttEndpoint.from_url(broker_url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"forger-{secrets.token_hex(4)}")
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    try:
        client.publish(desired_topic(device_id), payload, qos=1, retain=True).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def _rollout(client, bundle_id: str) -> dict:
    started = client.request("POST", "/rollouts", json={
        "bundle_id": bundle_id, "selector": {"fleet": "signed"}, "waves": [100],
        "gates": ["install_failure_ratio<=0.1"], "bake_s": 0, "min_reports": 1, "install_timeout_s": 120})
    return wait_for(lambda: (r := client.request("GET", f"/rollouts/{started['id']}"))["status"]
                    in ("succeeded", "rolled_back", "aborted", "failed") and r, 180, what="the rollout to finish")


def test_forged_and_downgrading_desired_states_are_refused_and_later_rollouts_still_arrive(tmp_path, releases):
    with MosquittoBroker() as broker, FleetProcess(tmp_path, broker.url, trusted_key=releases["pub"]) as fleet:
        client = fleet.client()
        ids = {v: client.upload(releases[v])["id"] for v in ("1", "2", "3", "4")}
        token = client.request("POST", "/devices/enrollment-tokens", json={"labels": {"fleet": "signed"}})["token"]
        [sim] = agent_configs(tmp_path, 1, [PROFILE], fleet.url, broker.url, token, releases["pub"])
        device = lambda: client.request("GET", f"/devices/{sim.device_id}")  # noqa: E731
        sim.start()
        try:
            wait_for(lambda: sim.agent.is_connected(), 60, what="the agent to enroll and connect")
            pinned = json.loads((sim.config.state_dir / "fleet_key.json").read_text())
            fleet_key = FleetDirector.load_or_create(tmp_path / "fleet-data").public()
            assert pinned == fleet_key.model_dump()  # the key enrollment handed out is the fleet's own

            assert _rollout(client, ids["2"])["status"] == "succeeded"
            wait_for(lambda: device()["current_bundle_id"] == ids["2"], 60, what="v2 active")
            seq_before = sim.agent.status().seq
            stored = device()["desired"]
            assert stored["sig"]["key_id"] == fleet_key.key_id and stored["device_id"] == sim.device_id

            # --- forgeries with a huge seq pointing at the older 1.0.0 bundle
            old = BundleRef.model_validate({**stored["bundle"], "id": ids["1"], "sha256": ids["1"], "version": "1.0.0",
                                            "url": f"/api/v1/bundles/{ids['1']}/download"})
            unsigned = DesiredState(rollout_id="evil", seq=HUGE_SEQ, action="install", bundle=old)
            other_key = FleetDirector(Ed25519PrivateKey.generate()).sign(
                unsigned.model_copy(update={"seq": HUGE_SEQ + 1}), device_id=sim.device_id, now=stored["issued_at"])
            for forged, reason in ((unsigned, "it is not signed"), (other_key, "signed by key")):
                _publish(broker.url, sim.device_id, encode(forged))
                reported = wait_for(lambda: (d := device())["last_status"]
                                    and d["last_status"].get("refused_seq") == forged.seq and d, 30,
                                    what=f"the refusal of seq {forged.seq} in the device's status")
                assert f"refused desired state seq {forged.seq}" in reported["error"] and reason in reported["error"]
                assert reported["current_bundle_id"] == ids["2"] and reported["phase"] == "active"
                assert reported["acked_seq"] == seq_before  # the refused seq did not become the device's
            assert sim.agent.refused_desired >= 2 and sim.agent.active_bundle().version == "2.0.0"

            # --- the fleet signs an install of the lower version: not a rollback, so the device refuses it
            downgrade = _rollout(client, ids["1"])
            [member] = downgrade["members"]
            assert f"refused to downgrade {stored['bundle']['name']} 2.0.0 to 1.0.0" in (member["error"] or ""), member
            assert downgrade["status"] == "rolled_back"  # the refusal is an install failure; the gate tripped
            assert sim.agent.active_bundle().version == "2.0.0"

            # --- the next legitimate rollout still reaches the device
            assert _rollout(client, ids["3"])["status"] == "succeeded"
            wait_for(lambda: device()["current_bundle_id"] == ids["3"] and device()["phase"] == "active", 60,
                     what="v3 active")
            assert sim.agent.active_bundle().version == "3.0.0"
            assert sim.agent.status().seq < HUGE_SEQ

            # --- key rotation: the server restarted with a next key re-signs the finished state with a
            # `next_key` statement; the device pins it beside the current one and says so in its status
            data_dir = tmp_path / "fleet-data"
            keys_of = lambda: (device()["last_status"] or {}).get("fleet_keys")  # noqa: E731
            assert keys_of() == [fleet_key.key_id]
            fleet.stop()
            announced = begin_rotation(data_dir)
            fleet.start()
            wait_for(lambda: keys_of() == [fleet_key.key_id, announced.key_id], 60, what="the device to pin the next key")
            assert json.loads((sim.config.state_dir / "fleet_key.json").read_text())["next"]["key_id"] == announced.key_id
            # once every device pins it, the next key takes over: the next rollout is signed by it alone
            fleet.stop()
            finish_rotation(data_dir)
            fleet.start()
            assert _rollout(client, ids["4"])["status"] == "succeeded"
            assert device()["desired"]["sig"]["key_id"] == announced.key_id
            wait_for(lambda: keys_of() == [announced.key_id], 60, what="the device to forget the old key")
            assert sim.agent.active_bundle().version == "4.0.0"
            # the retired key no longer speaks for the fleet
            retired = FleetDirector(load_private_key(data_dir / f"director-retired-{fleet_key.key_id}" / "edgepack.key"))
            stale = retired.sign(unsigned.model_copy(update={"seq": HUGE_SEQ + 2}), device_id=sim.device_id,
                                 now=device()["desired"]["issued_at"])
            _publish(broker.url, sim.device_id, encode(stale))
            wait_for(lambda: (device()["last_status"] or {}).get("refused_seq") == stale.seq, 30,
                     what="the refusal of a state signed by the retired key")
            assert f"signed by key {fleet_key.key_id}" in device()["error"]
            assert sim.agent.active_bundle().version == "4.0.0"
        finally:
            sim.stop()
