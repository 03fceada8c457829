"""Rollout benchmark: N real agents on this machine against a real Mosquitto and `edgepack fleet serve`.

Prints, in one run:
  - time from rollout start to every device active, against the lower bound of one download per device
    at the loopback bandwidth measured here (N × bundle size / bandwidth) plus the bake time of every wave;
  - the fleet's status-message handling rate: valid DeviceStatus messages published as fast as one client
    can, timed until the server has handled all of them (its /metrics counter).
Numbers are printed, never asserted.

    python benchmarks/bench_rollout.py [--agents 100] [--bake 1] [--statuses 3000]
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgepack.protocol import DeviceStatus, encode, status_topic  # noqa: E402
from edgepack.signing import generate_keypair  # noqa: E402
from testbeds.fleet_harness import FleetProcess, agent_configs, build_release, wait_for  # noqa: E402
from testbeds.mosquitto import MosquittoBroker  # noqa: E402

PROFILES = ["jetson-orin-nano", "x86-avx2"]


def metric(fleet: FleetProcess, name: str, labels: str = "") -> float:
    import httpx

    text = httpx.get(fleet.url + "/metrics", timeout=10).text
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*{re.escape(labels)}[^}}]*\}})?\s+([0-9.e+]+)$", re.M)
    return sum(float(m.group(2)) for m in pattern.finditer(text))


def loopback_bandwidth(fleet: FleetProcess, bundle_id: str, size: int, repeats: int = 20) -> float:
    import httpx

    headers = {"Authorization": f"Bearer {fleet.admin_token}"}
    with httpx.Client(base_url=fleet.url, headers=headers, timeout=30) as http:
        http.get(f"/api/v1/bundles/{bundle_id}/download")
        started = time.perf_counter()
        for _ in range(repeats):
            http.get(f"/api/v1/bundles/{bundle_id}/download").read()
        return size * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--bake", type=float, default=1.0, help="bake seconds per wave")
    parser.add_argument("--waves", default="10,50,100")
    parser.add_argument("--statuses", type=int, default=3000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="edgepack-bench-rollout-"))
    waves = [float(w) for w in args.waves.split(",")]
    agents = []
    try:
        private, public = generate_keypair(root / "keys")
        bundles = build_release(root, private, "2.0.0", PROFILES)
        with MosquittoBroker() as broker, FleetProcess(root, broker.url, trusted_key=public) as fleet:
            client = fleet.client()
            ids = [client.upload(path)["id"] for path in bundles]
            sizes = [path.stat().st_size for path in bundles]
            token = client.request("POST", "/devices/enrollment-tokens", json={"uses": args.agents, "labels": {"bench": "1"}})["token"]
            agents = agent_configs(root, args.agents, PROFILES, fleet.url, broker.url, token, public)
            for agent in agents:
                agent.start()
            wait_for(lambda: len(client.request("GET", "/devices")) == args.agents, 300, what="enrollments")
            wait_for(lambda: all(d["online"] for d in client.request("GET", "/devices")), 120, what="every agent online")
            bandwidth = loopback_bandwidth(fleet, ids[0], sizes[0])
            messages_before = metric(fleet, "edgepack_desired_states_published_total")

            started = time.perf_counter()
            rollout = client.request("POST", "/rollouts", json={
                "bundle_id": ids[0], "selector": {"bench": "1"}, "waves": waves, "gates": ["install_failure_ratio<=0"],
                "bake_s": args.bake, "min_reports": 1, "install_timeout_s": 600})

            def all_active():
                devices = client.request("GET", "/devices")
                return all(d["current_bundle_id"] in ids and d["phase"] == "active" for d in devices)

            wait_for(all_active, 900, interval_s=0.2, what="every device active")
            to_active = time.perf_counter() - started
            final = wait_for(lambda: (r := client.request("GET", f"/rollouts/{rollout['id']}"))["status"] in ("succeeded", "rolled_back") and r,
                             300, interval_s=0.2, what="the rollout decision")
            to_succeeded = time.perf_counter() - started
            desired = metric(fleet, "edgepack_desired_states_published_total") - messages_before

            # status-message handling rate: valid, stale-seq statuses the server must parse, check and store
            import paho.mqtt.client as mqtt

            host, port = broker.url.split("://")[1].rsplit(":", 1)
            publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-status")
            publisher.max_inflight_messages_set(1000)
            publisher.connect(host, int(port))
            publisher.loop_start()
            handled_before = metric(fleet, "edgepack_mqtt_messages_total", 'kind="status"')
            t0 = time.perf_counter()
            batch = 500
            for start in range(0, args.statuses, batch):
                infos = []
                for index in range(start, min(start + batch, args.statuses)):
                    device = agents[index % len(agents)].device_id
                    status = DeviceStatus(device_id=device, seq=0, phase="active", current_bundle=ids[0], ts=time.time())
                    infos.append(publisher.publish(status_topic(device), encode(status), qos=1, retain=False))
                for info in infos:
                    info.wait_for_publish(30)
                target = min(start + batch, args.statuses)
                wait_for(lambda: metric(fleet, "edgepack_mqtt_messages_total", 'kind="status"') - handled_before >= target,
                         300, interval_s=0.05, what="the server to handle the status burst")
            published_s = time.perf_counter() - t0
            handled_s = time.perf_counter() - t0
            publisher.loop_stop()
            publisher.disconnect()
    finally:
        for agent in agents:
            agent.stop()
        shutil.rmtree(root, ignore_errors=True)

    size = sum(sizes) / len(sizes)
    lower_bound = args.agents * size / bandwidth + args.bake * len(waves)
    print(f"\nedgepack rollout benchmark — {args.agents} agents ({', '.join(PROFILES)}), waves {args.waves}, bake {args.bake:g} s/wave\n")
    print(f"bundle size                      {size / 1024:.1f} KB")
    print(f"loopback download bandwidth      {bandwidth / 1e6:.1f} MB/s (measured through the fleet's download route)")
    print(f"rollout start → all active       {to_active:.2f} s")
    print(f"rollout start → succeeded        {to_succeeded:.2f} s  ({final['status']})")
    print(f"lower bound                      {lower_bound:.2f} s  (= {args.agents} downloads at that bandwidth "
          f"{args.agents * size / bandwidth:.2f} s + bake {args.bake * len(waves):.2f} s)")
    print(f"ratio to the lower bound         {to_active / lower_bound:.2f}x (all active), {to_succeeded / lower_bound:.2f}x (succeeded)")
    print(f"desired states published         {desired:.0f}")
    print(f"status messages handled          {args.statuses} in {handled_s:.2f} s = {args.statuses / handled_s:.0f} msg/s "
          f"(publishing alone took {published_s:.2f} s)")


if __name__ == "__main__":
    main()
