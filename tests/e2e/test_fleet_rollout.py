"""Issue 4 acceptance, end to end: a Mosquitto process, `edgepack fleet serve` under uvicorn on loopback,
20 real agents of two hardware profiles, on SQLite and on PostgreSQL.

On the secure path (issue 10): the broker refuses anonymous clients and holds one identity per device (the
dynamic security plugin, managed by the fleet with --mqtt-dynsec), agents log in with their credential and
require signed desired states."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edgepack.signing import generate_keypair
from testbeds.fleet_harness import DesiredMonitor, FleetProcess, agent_configs, build_release, wait_for
from testbeds.mosquitto import MosquittoBroker
from tests.support import fresh_database

PROFILES = ["jetson-orin-nano", "x86-avx2"]
N_AGENTS = 20


@pytest.fixture(scope="module")
def release_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    private, public = generate_keypair(root / "keys")
    return {
        "key": private, "pub": public,
        "v2": build_release(root, private, "2.0.0", PROFILES),
        "v3": build_release(root, private, "3.0.0", PROFILES, break_selftest=True),
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield None
        return
    with fresh_database(request.getfixturevalue("postgres_url"), "edgepack_e2e") as url:
        yield url


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _devices(fleet) -> dict[str, dict]:
    return {d["id"]: d for d in fleet.client().request("GET", "/devices")}


def _rollout(fleet, rollout_id: str) -> dict:
    return fleet.client().request("GET", f"/rollouts/{rollout_id}")


def _finished(fleet, rollout_id: str):
    status = _rollout(fleet, rollout_id)
    return status if status["status"] in ("succeeded", "rolled_back", "aborted", "failed") else None


def test_rollout_succeeds_then_a_broken_release_rolls_back(tmp_path, db_url, release_bundles):
    with MosquittoBroker(secure=True) as broker, \
            FleetProcess.for_broker(broker, tmp_path, trusted_key=release_bundles["pub"], db_url=db_url) as fleet:
        client = fleet.client()
        v2 = [client.upload(path)["id"] for path in release_bundles["v2"]]
        v3 = [client.upload(path)["id"] for path in release_bundles["v3"]]
        token = client.request("POST", "/devices/enrollment-tokens", json={"labels": {"fleet": "e2e"}, "uses": N_AGENTS})["token"]
        agents = agent_configs(tmp_path, N_AGENTS, PROFILES, fleet.url, broker.url, token, release_bundles["pub"],
                               extra={"require_signed_desired": True})
        # one device is offline when the rollout starts: it must converge when it comes back
        offline, online = agents[-1], agents[:-1]
        monitor = DesiredMonitor(broker.fleet_url)  # only the fleet's identity may read every device's topics
        try:
            for agent in online:
                agent.start()
            wait_for(lambda: len(_devices(fleet)) == N_AGENTS - 1, 60, what="enrollments")
            offline.start()
            wait_for(lambda: len(_devices(fleet)) == N_AGENTS, 60, what="the last enrollment")
            offline.stop()

            # --- v2 over waves 10/50/100, the server killed and restarted after the first decision
            started = client.request("POST", "/rollouts", json={
                "bundle_id": v2[0], "selector": {"fleet": "e2e"}, "waves": [10, 50, 100],
                "gates": ["install_failure_ratio<=0.1", "active_ratio>=1.0"], "bake_s": 1, "min_reports": 1,
                "install_timeout_s": 120})
            rollout_id = started["id"]
            assert started["members_total"] == N_AGENTS
            wait_for(lambda: _rollout(fleet, rollout_id)["decisions"], 120, what="the first wave decision")
            fleet.kill()
            fleet.start()
            offline.start()  # back online mid-rollout
            final = wait_for(lambda: _finished(fleet, rollout_id), 240, what="the v2 rollout to finish")
            assert final["status"] == "succeeded", final["decisions"]
            assert [w["percent"] for w in final["waves"]] == [10, 50, 100]
            devices = wait_for(lambda: (d := _devices(fleet)) and all(x["current_bundle_id"] in v2 and x["phase"] == "active"
                                                                       for x in d.values()) and d, 60,
                               what="every device to report v2 active")
            for device in devices.values():
                profile_bundle = v2[PROFILES.index("jetson-orin-nano" if device["profile"].startswith("jetson") else "x86-avx2")]
                assert device["current_bundle_id"] == profile_bundle  # each device got its own profile's bundle
            # every wave's decision is in the audit log
            audit = client.request("GET", "/audit", params={"target": rollout_id, "limit": 500})
            decided = [e for e in audit if e["action"].startswith("rollout.decision") or e["action"].startswith("rollout.wave")]
            assert len(decided) >= 3, [e["action"] for e in audit]
            # holds (not enough reports yet) may come first; every wave ends in a promote, none rolled back
            assert {d["decision"] for d in final["decisions"]} <= {"promote", "hold"}
            assert sorted(d["wave"] for d in final["decisions"] if d["decision"] == "promote") == [0, 1, 2]
            # no device received two different desired states for the same rollout
            assert monitor.per_device() and all(p["sig"] for ps in monitor.per_device().values() for p in ps)  # all signed
            for device_id, payloads in monitor.per_device().items():
                for_rollout = {(p["seq"], p["action"], (p.get("bundle") or {}).get("id")) for p in payloads if p.get("rollout_id") == rollout_id}
                assert len(for_rollout) == 1, (device_id, for_rollout)

            # --- v3 fails its self-test on the devices: wave 1 trips the gate, every touched device ends on v2
            broken = client.request("POST", "/rollouts", json={
                "bundle_id": v3[0], "selector": {"fleet": "e2e"}, "waves": [10, 50, 100],
                "gates": ["install_failure_ratio<=0.1"], "bake_s": 1, "min_reports": 1, "install_timeout_s": 120})
            final3 = wait_for(lambda: _finished(fleet, broken["id"]), 180, what="the v3 rollout to finish")
            assert final3["status"] == "rolled_back"
            rollback = final3["decisions"][-1]
            assert rollback["decision"] == "rollback" and rollback["wave"] == 0
            assert "install_failure_ratio" in str(rollback["evidence"])
            touched = [m for m in final3["members"] if m["phase"] not in ("waiting", "skipped")]
            assert touched and all(m["wave"] == 0 for m in touched)
            # every touched member is sent back; once it answers, it is rolled_back, and the self-test failure
            # that tripped the gate stays on the member as its last error
            touched_ids = {m["device_id"] for m in touched}
            settled = wait_for(lambda: (r := _rollout(fleet, broken["id"])) and all(
                m["phase"] == "rolled_back" for m in r["members"] if m["device_id"] in touched_ids) and r, 60,
                what="every touched member to answer its rollback")
            assert any("self-test" in (m["error"] or "") for m in settled["members"] if m["device_id"] in touched_ids)
            wait_for(lambda: all(x["current_bundle_id"] in v2 for x in _devices(fleet).values()), 60,
                     what="every device back on v2")
        finally:
            monitor.close()
            for agent in agents:
                agent.stop()
