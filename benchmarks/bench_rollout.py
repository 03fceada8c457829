"""Rollout benchmark: N real agents on this machine against a real Mosquitto and `edgepack fleet serve`,
with and without the device plane's security, interleaved in one process so a busy host hits both alike.

Each round starts a fresh broker, fleet and N agents in one of these modes:
  insecure  anonymous Mosquitto, the fleet manages no identities
  secure    Mosquitto with the dynamic security plugin (no anonymous clients, per-device topic rights), the
            fleet creating each device's identity as it enrolls (--mqtt-dynsec), agents logging in with their
            credential and requiring signed desired states (the fleet signs in every mode)
  tls       secure, plus mqtts:// and HTTPS with a lab CA
and measures:
  - enrollment: agents started → every device enrolled, and → every device online over MQTT;
  - rollout start → every device active, against the lower bound of one download per device at the
    loopback bandwidth measured in that round (N × bundle size / bandwidth) plus the bake time of every wave;
  - where that time went, per wave: how long its devices took (wave start → its last device seen active,
    polled every 0.1 s: downloads, verification, install and self-test of agents that share this host), and
    what the fleet added (the promotion after both the bake and the last device). `critical path` is
    Σ max(bake, devices) over the promoted waves plus the last wave's devices: the rollout time a fleet
    that added nothing would have with these devices; `fleet added` is the rest;
  - the agent message rate the fleet handles: valid DeviceStatus messages published on every agent's own
    MQTT connection (its identity, through the broker's ACL checks), as fast as they go, timed until the
    server has handled all of them (its /metrics counter).
Then per mode the median over its rounds and the ratio of each mode to insecure. Numbers are printed, never asserted.

    python benchmarks/bench_rollout.py [--agents 100] [--bake 1] [--statuses 3000] [--modes insecure,secure,insecure,secure]
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgepack.protocol import DeviceStatus, encode, status_topic  # noqa: E402
from edgepack.signing import generate_keypair  # noqa: E402
from testbeds.fleet_harness import FleetProcess, agent_configs, build_release, lab_pki, wait_for  # noqa: E402
from testbeds.mosquitto import MosquittoBroker  # noqa: E402

PROFILES = ["jetson-orin-nano", "x86-avx2"]
MODES = ("insecure", "secure", "tls")


def metric(fleet: FleetProcess, name: str, labels: str = "") -> float:
    import httpx

    text = httpx.get(fleet.url + "/metrics", timeout=10, verify=fleet.verify).text
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*{re.escape(labels)}[^}}]*\}})?\s+([0-9.e+]+)$", re.M)
    return sum(float(m.group(2)) for m in pattern.finditer(text))


def loopback_bandwidth(fleet: FleetProcess, bundle_id: str, size: int, repeats: int = 20) -> float:
    import httpx

    headers = {"Authorization": f"Bearer {fleet.admin_token}"}
    with httpx.Client(base_url=fleet.url, headers=headers, timeout=30, verify=fleet.verify) as http:
        http.get(f"/api/v1/bundles/{bundle_id}/download")
        started = time.perf_counter()
        for _ in range(repeats):
            http.get(f"/api/v1/bundles/{bundle_id}/download").read()
        return size * repeats / (time.perf_counter() - started)


def run_round(root: Path, mode: str, bundles: list[Path], public: Path, args) -> dict[str, Any]:
    """One fresh broker, fleet and `args.agents` agents in `mode`; the measured numbers."""
    waves = [float(w) for w in args.waves.split(",")]
    root.mkdir(parents=True)
    pki = lab_pki(root) if mode == "tls" else None
    secure = mode != "insecure"
    extra = {**({"require_signed_desired": True} if secure else {}), **({"ca_file": str(pki.ca)} if pki else {})}
    agents = []
    with MosquittoBroker(secure=secure, tls=pki.broker if pki else None) as broker, \
            FleetProcess.for_broker(broker, root, trusted_key=public, tls=pki.fleet if pki else None) as fleet:
        try:
            client = fleet.client()
            ids = [client.upload(path)["id"] for path in bundles]
            sizes = [path.stat().st_size for path in bundles]
            token = client.request("POST", "/devices/enrollment-tokens", json={"uses": args.agents, "labels": {"bench": "1"}})["token"]
            agents = agent_configs(root, args.agents, PROFILES, fleet.url, broker.url, token, public, extra=extra)
            started = time.perf_counter()
            for agent in agents:
                agent.start()
            wait_for(lambda: len(client.request("GET", "/devices")) == args.agents, 300, 0.2, what="enrollments")
            enrolled_s = time.perf_counter() - started
            wait_for(lambda: all(d["online"] for d in client.request("GET", "/devices")), 120, 0.2, what="every agent online")
            online_s = time.perf_counter() - started
            bandwidth = loopback_bandwidth(fleet, ids[0], sizes[0])

            started = time.perf_counter()
            started_wall = time.time()
            first_active: dict[str, float] = {}  # device id -> first poll that saw it active on the new bundle
            rollout = client.request("POST", "/rollouts", json={
                "bundle_id": ids[0], "selector": {"bench": "1"}, "waves": waves, "gates": ["install_failure_ratio<=0"],
                "bake_s": args.bake, "min_reports": 1, "install_timeout_s": 600})

            def all_active():
                devices = client.request("GET", "/devices")
                now = time.time()
                for d in devices:
                    if d["current_bundle_id"] in ids and d["phase"] == "active":
                        first_active.setdefault(d["id"], now)
                return len(first_active) == len(devices)

            wait_for(all_active, 900, interval_s=0.1, what="every device active")
            to_active = time.perf_counter() - started
            final = wait_for(lambda: (r := client.request("GET", f"/rollouts/{rollout['id']}"))["status"] in ("succeeded", "rolled_back") and r,
                             300, interval_s=0.2, what="the rollout decision")
            to_succeeded = time.perf_counter() - started
            handled_s = _status_burst(fleet, agents, ids[0], args.statuses)
        finally:
            for agent in agents:
                agent.stop()
    size = sum(sizes) / len(sizes)
    lower_bound = args.agents * size / bandwidth + args.bake * len(waves)
    path = critical_path(final, started_wall, first_active, args.bake)
    return {"mode": mode, **path, "ratio_path": to_active / path["critical_path_s"], "enrolled_s": enrolled_s, "online_s": online_s, "to_active_s": to_active,
            "to_succeeded_s": to_succeeded, "status": final["status"], "lower_bound_s": lower_bound,
            "ratio_active": to_active / lower_bound, "bandwidth": bandwidth, "size": size,
            "msg_per_s": args.statuses / handled_s}


def critical_path(rollout: dict[str, Any], started: float, first_active: dict[str, float], bake: float) -> dict[str, Any]:
    """Per wave: when it started (the rollout's POST, then each promotion), how long until its last device
    was seen active, and the promotion's delay after both its bake and that device; summed up."""
    promoted = {d["wave"]: _epoch(d["at"]) for d in rollout["decisions"] if d["decision"] == "promote"}
    waves: dict[int, list[str]] = {}
    for member in rollout["members"]:
        waves.setdefault(member["wave"], []).append(member["device_id"])
    path = added = 0.0
    spans = []
    wave_start = started
    for index in sorted(waves):
        last = max(first_active.get(device, wave_start) for device in waves[index])
        span = last - wave_start
        spans.append(span)
        end = promoted.get(index)
        if end is None or index == max(waves):  # the last wave: all active is where the clock stops
            path += span
            break
        path += max(bake, span)
        added += end - wave_start - max(bake, span)
        wave_start = end
    return {"critical_path_s": path, "fleet_added_s": added, "device_spans_s": spans}


def _epoch(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso).timestamp()


def _status_burst(fleet: FleetProcess, agents, bundle_id: str, count: int) -> float:
    """Seconds for the fleet to handle `count` statuses sent round-robin on the agents' own connections
    (valid, stale-seq statuses the server must parse, check and store). Fewer per device than the fleet's
    per-device burst budget (EDGEPACK_DEVICE_MESSAGE_BURST), so none is throttled."""
    handled_before = metric(fleet, "edgepack_mqtt_messages_total", 'kind="status"')
    t0 = time.perf_counter()
    batch = 500
    for start in range(0, count, batch):
        infos = []
        for index in range(start, min(start + batch, count)):
            agent = agents[index % len(agents)]
            status = DeviceStatus(device_id=agent.device_id, seq=0, phase="active", current_bundle=bundle_id, ts=time.time())
            infos.append(agent.agent.publish(status_topic(agent.device_id), encode(status), qos=1, retain=False))
        for info in infos:
            info.wait_for_publish(30)
        target = min(start + batch, count)
        wait_for(lambda: metric(fleet, "edgepack_mqtt_messages_total", 'kind="status"') - handled_before >= target,
                 300, interval_s=0.05, what="the server to handle the status burst")
    return time.perf_counter() - t0


ROWS = (("enrolled_s", "agents started → all enrolled", "s"), ("online_s", "agents started → all online (MQTT)", "s"),
        ("to_active_s", "rollout start → all active", "s"), ("to_succeeded_s", "rollout start → succeeded", "s"),
        ("ratio_active", "all active / lower bound", "x"), ("critical_path_s", "critical path (bake, devices)", "s"),
        ("fleet_added_s", "fleet added beyond it", "s"), ("ratio_path", "all active / critical path", "x"),
        ("msg_per_s", "agent status messages handled", "msg/s"))


def report(results: list[dict[str, Any]], args) -> None:
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    median = {m: {key: statistics.median(r[key] for r in results if r["mode"] == m) for key, _, _ in ROWS} for m in modes}
    size = results[0]["size"]
    print(f"\nedgepack rollout benchmark — {args.agents} agents ({', '.join(PROFILES)}), waves {args.waves}, "
          f"bake {args.bake:g} s/wave, bundle {size / 1024:.1f} KB, {args.statuses} statuses")
    print("rounds, in the order run (interleaved):")
    for r in results:
        print(f"  {r['mode']:<9} enrolled {r['enrolled_s']:6.2f} s  online {r['online_s']:6.2f} s  active {r['to_active_s']:6.2f} s "
              f"(lower bound {r['lower_bound_s']:.2f} s at {r['bandwidth'] / 1e6:.0f} MB/s = {r['ratio_active']:.2f}x)  "
              f"succeeded {r['to_succeeded_s']:6.2f} s ({r['status']})  {r['msg_per_s']:6.0f} msg/s")
        print(f"  {'':<9} devices per wave {' / '.join(f'{s:.2f}' for s in r['device_spans_s'])} s, critical path "
              f"{r['critical_path_s']:.2f} s, fleet added {r['fleet_added_s']:.2f} s = {r['ratio_path']:.2f}x the critical path")
    header = f"\n{'median per mode':<38}" + "".join(f"{m:>12}" for m in modes) + "".join(f"{m + '/insecure':>20}" for m in modes if m != "insecure")
    print(header)
    for key, label, unit in ROWS:
        line = f"{label + f' ({unit})':<38}" + "".join(f"{median[m][key]:12.2f}" for m in modes)
        if "insecure" in median:
            line += "".join(f"{median[m][key] / median['insecure'][key]:19.2f}x" for m in modes if m != "insecure")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--bake", type=float, default=1.0, help="bake seconds per wave")
    parser.add_argument("--waves", default="10,50,100")
    parser.add_argument("--statuses", type=int, default=3000)
    parser.add_argument("--modes", default="insecure,secure,insecure,secure",
                        help=f"rounds to run, in this order ({', '.join(MODES)})")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="edgepack-bench-rollout-"))
    results = []
    try:
        private, public = generate_keypair(root / "keys")
        bundles = build_release(root, private, "2.0.0", PROFILES)
        for index, mode in enumerate(modes):
            results.append(run_round(root / f"round-{index}-{mode}", mode, bundles, public, args))
            print(f"round {index + 1}/{len(modes)} ({mode}) done", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(results, args)


if __name__ == "__main__":
    main()
