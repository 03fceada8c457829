"""Fleet scale benchmark (issue 12): 10,000 lightweight simulated devices against Mosquitto, PostgreSQL and
1, 2 and 3 `edgepack fleet serve` replicas, every number beside its reference, in one run.

The devices are testbeds.lite.LiteFleet: each its own MQTT connection (client id = device id), real
status and telemetry messages, no model; 10,000 of them run on one core.

Part 1, ingestion (`--replicas 1,2,3`, interleaved over `--rounds`). Each round: a fresh Mosquitto, a fresh
PostgreSQL database (a throwaway server from testbeds/postgres.py unless --db-url names one; --sqlite for
SQLite), R fleet replicas in one shared subscription group; --devices enrolled devices connect and publish
--windows valid telemetry windows between them (about 925 bytes each, QoS 1) as fast as the broker takes
them. A bare paho subscriber on the same topics counts what it receives.
  bare      windows/s the bare subscriber received (first publish → its last message)
  stored    windows/s the fleet stored (first publish → the last row committed, counted in the database)
  vs bare   stored / bare          (issue 12: >= 0.5 on PostgreSQL with one replica)
  vs 1      stored with R replicas / with one (issue 12: two >= 1.6x one)
  dups      rows beyond the windows sent (must be 0); lost: windows sent but never stored (must be 0)

Part 1b, a backlog (`--parts drain`): the same, but the replicas are paused (SIGSTOP) while the devices
publish, so the broker queues each replica's share in its session, and resumed (SIGCONT) once the bare
subscriber has everything: stored/s counts from the resume to the last row. It is what the replicas
themselves can store, with no publisher sharing the host's cores: on a 2-core host the live rate of two or
three replicas is capped by what the broker delivers while 10,000 publishers run beside them.

Part 2, a rollout of every device (`--bake` 60 s, `--waves` 10,100, the default 10 % hold-back, install and
telemetry gates, devices reporting a window every --telemetry-every s), on one replica:
  - what the broker can carry: a bare publisher sends a desired state to each of N other lite devices and
    waits for their two statuses back (downloading, active): desired states round-tripped per second;
  - per wave: desired states delivered to devices per second (first to last arrival) and acknowledged
    (wave start → every member stored `active`) per second;
  - wave evaluation: the controller's CPU per evaluation from the fleet's /metrics
    (edgepack_wave_evaluation_cpu_seconds, every tick of the rollout), and the look that promoted the 10 %
    wave replayed in this process on the same database (same code: fleet.services.gates.evaluate_gates),
    CPU seconds (issue 12: under one second);
  - rollout time (POST → succeeded, every device on the new bundle) against its lower bound: the bake of
    every wave plus N desired states at the rate the broker carried them.

Numbers are printed, never asserted.

    python benchmarks/bench_fleet_scale.py [--devices 10000] [--windows 20000] [--rounds 1] [--replicas 1,2,3]
        [--parts ingest,rollout] [--bake 60] [--waves 10,100] [--telemetry-every 30] [--sqlite] [--db-url URL]

A note on one process holding 10,000 sockets: select() cannot watch a descriptor above 1023 (paho's own
loop uses it), so every paho client of this process that is not a lite device is created before the lite
devices are.
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgepack.histogram import LatencyHistogram  # noqa: E402
from edgepack.protocol import Telemetry, encode  # noqa: E402
from edgepack.signing import generate_keypair  # noqa: E402
from testbeds.fleet_harness import FleetProcess, wait_for  # noqa: E402
from testbeds.lite import LiteFleet  # noqa: E402
from testbeds.mosquitto import MosquittoBroker  # noqa: E402


def window_payload(device_id: str, n: int, bundle_id: str | None = "ab" * 32) -> bytes:
    """A realistic window: a full latency histogram and a few drift scores (~925 bytes)."""
    histogram = LatencyHistogram()
    for i in range(40):
        histogram.add(2.0 + (i % 7) * 0.4 + n % 3)
    return encode(Telemetry(device_id=device_id, window_id=uuid.uuid4().hex, bundle_id=bundle_id, window_s=10.0,
                            inferences=400 + n % 50, errors=n % 2, latency_ms=histogram.summary(),
                            drift={"input": 0.01 * (n % 5), "output": 0.02}, drift_method="psi", rss_bytes=123_456_789,
                            ts=time.time()))


class BareSubscriber:
    def __init__(self, url: str) -> None:
        import paho.mqtt.client as mqtt

        from fleet.mqtt_bridge import parse_mqtt_url

        endpoint = parse_mqtt_url(url)
        self.count = 0
        self.last = 0.0
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bare-{secrets.token_hex(3)}")
        if endpoint.get("username"):
            self.client.username_pw_set(endpoint["username"], endpoint.get("password"))
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("edgepack/v1/devices/+/telemetry", qos=1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect(endpoint["host"], endpoint["port"])
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        self.count += 1
        self.last = time.monotonic()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def enroll(db_url: str, device_ids: list[str], bundle_id: str | None = None, labels: dict | None = None) -> None:
    from sqlalchemy import insert

    from fleet.db import make_engine
    from fleet.models import Device

    engine = make_engine(db_url)
    now = dt.datetime.now(dt.timezone.utc)
    rows = [dict(id=d, profile="rpi5", labels=labels or {}, credential_hash=secrets.token_hex(32), online=False,
                 phase="active" if bundle_id else "idle", acked_seq=0, desired_seq=0, current_bundle_id=bundle_id,
                 enrolled_at=now) for d in device_ids]
    with engine.begin() as connection:
        for start in range(0, len(rows), 2000):
            connection.execute(insert(Device), rows[start:start + 2000])
    engine.dispose()


def stored_rows(engine) -> int:
    from sqlalchemy import func, select

    from fleet.models import TelemetryWindow

    with engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(TelemetryWindow))


def start_replicas(root: Path, broker_url: str, db_url: str, public_key: Path, replicas: int,
                   extra: list[str] | None = None) -> list[FleetProcess]:
    fleets = []
    for i in range(replicas):
        fleet = FleetProcess(root, broker_url, trusted_key=public_key, db_url=db_url,
                             extra_args=["--mqtt-client-id", f"fleet-{i}-{secrets.token_hex(3)}"]
                             + (["--mqtt-share-group", "bench"] if replicas > 1 else []) + list(extra or []))
        fleet.log_path = root / f"fleet-{i}.log"
        fleets.append(fleet.start(timeout_s=120))
    return fleets


# A paused replica's share of a backlog waits in its session (the drain part): let the broker hold all of it.
BROKER_CONFIG = "max_inflight_messages 1000\nmax_queued_messages 1000000\n"


def ingest_round(root: Path, db_url: str, args, public_key: Path, replicas: int, drain: bool = False) -> dict[str, Any]:
    """Live (drain=False): the replicas store while the devices publish. Drain: the replicas are paused
    (SIGSTOP) while the devices publish, the broker queues their shares, and the rate counts from their
    SIGCONT to the last row: what the replicas store with no publisher on the cores."""
    import os
    import signal

    from fleet.db import make_engine

    per_device = max(1, args.windows // args.devices)
    total = per_device * args.devices
    device_ids = [f"sim-{i:05d}" for i in range(args.devices)]
    with MosquittoBroker(secure=False, extra_config=BROKER_CONFIG) as broker:
        fleets = start_replicas(root, broker.url, db_url, public_key, replicas)
        engine = make_engine(db_url)
        devices = None
        try:
            enroll(db_url, device_ids)
            bare = BareSubscriber(broker.url)  # before the lite devices' sockets (see the module's note)
            assert bare.ready.wait(10), "the bare subscriber did not subscribe"
            devices = LiteFleet(broker.url, device_ids).start()
            payloads = {d: [window_payload(d, n) for n in range(per_device)] for d in device_ids}
            time.sleep(1.0)  # the devices' first statuses are stored; the bare subscriber counts windows only
            bare.count = 0
            if drain:
                for fleet in fleets:
                    os.kill(fleet.process.pid, signal.SIGSTOP)
            started = time.monotonic()
            devices.burst(payloads)
            wait_for(lambda: bare.count >= total, 600, interval_s=0.01, what="the bare subscriber to receive every window")
            bare_done = bare.last
            if drain:
                bare_rate = total / max(bare_done - started, 1e-9)
                time.sleep(1.0)  # the broker has queued the replicas' shares
                started = time.monotonic()
                for fleet in fleets:
                    os.kill(fleet.process.pid, signal.SIGCONT)
            last_count, stored_at = 0, time.monotonic()
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                count = stored_rows(engine)
                if count != last_count:
                    last_count, stored_at = count, time.monotonic()
                if count >= total:
                    break
                if time.monotonic() - stored_at > 20:  # nothing new for 20 s: it will not come
                    break
                time.sleep(0.05)
            time.sleep(1.0)
            final = stored_rows(engine)
            bare.close()
        finally:
            if devices is not None:
                devices.stop()
            engine.dispose()
            for fleet in fleets:
                fleet.stop()
    if not drain:
        bare_rate = total / max(bare_done - started, 1e-9)
    fleet_rate = min(final, total) / max(stored_at - started, 1e-9)
    return {"replicas": replicas, "windows": total, "bare_rate": bare_rate, "fleet_rate": fleet_rate,
            "ratio": fleet_rate / bare_rate, "dups": max(0, final - total), "lost": max(0, total - final)}


# ---------------------------------------------------------------------------------------------------
# part 2: a rollout of every device


def broker_carry_rate(broker_url: str, n: int) -> float:
    """Desired states a bare publisher round-trips per second through this broker to `n` lite devices (a
    desired state out, the device's two statuses back), all sent at once as the controller does."""
    import json

    import paho.mqtt.client as mqtt

    from edgepack.protocol import desired_topic
    from fleet.mqtt_bridge import parse_mqtt_url

    statuses = [0]
    done = threading.Event()

    def on_message(client, userdata, message) -> None:
        statuses[0] += 1
        if statuses[0] >= 2 * n:
            done.set()

    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"carry-{secrets.token_hex(3)}")
    client.max_inflight_messages_set(1000)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    endpoint = parse_mqtt_url(broker_url)
    client.connect(endpoint["host"], endpoint["port"])
    client.loop_start()
    client.subscribe("edgepack/v1/devices/+/status", qos=1)
    assert subscribed.wait(10)
    device_ids = [f"carry-{i:05d}" for i in range(n)]
    devices = LiteFleet(broker_url, device_ids).start()
    try:
        time.sleep(1.0)
        statuses[0] = 0
        body = {"action": "install", "seq": 1, "rollout_id": "carry", "bundle": {"id": "cd" * 32, "url": "/x", "sha256": "cd" * 32, "size": 1}}
        payloads = [json.dumps({**body, "device_id": d}).encode() for d in device_ids]
        started = time.monotonic()
        for device_id, payload in zip(device_ids, payloads):
            client.publish(desired_topic(device_id), payload, qos=1, retain=False)
        done.wait(300)
        elapsed = time.monotonic() - started
    finally:
        devices.stop()
        client.disconnect()
        client.loop_stop()
    return min(statuses[0] / 2, n) / elapsed


def histogram_metric(fleet: FleetProcess, name: str) -> dict[str, float]:
    import re

    import httpx

    text = httpx.get(fleet.url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for key in ("count", "sum"):
        match = re.search(rf"^{name}_{key}\s+([0-9.e+-]+)$", text, re.M)
        out[key] = float(match.group(1)) if match else 0.0
    for le, value in re.findall(rf'^{name}_bucket{{le="([^"]+)"}}\s+([0-9.e+-]+)$', text, re.M):
        out[f"le_{le}"] = float(value)
    return out


def replay_promoting_look(db_url: str, rollout_id: str, wave: int, wave_started_at: dt.datetime,
                          repeats: int = 3) -> dict[str, float]:
    """Evaluate wave `wave` again as the controller did at the decision that promoted it (same database,
    same code); CPU and wall seconds of this thread: the first (a cold process: imports, compiled
    statements) apart, then the median of the others (the controller's thread is warm: it judges every tick)."""
    from sqlalchemy import select

    from fleet.db import make_engine, make_session_factory
    from fleet.models import Rollout, RolloutDecision, RolloutMember
    from fleet.services.gates import evaluate_gates

    engine = make_engine(db_url)
    cpu, wall, windows = [], [], 0
    try:
        factory = make_session_factory(engine)
        for _ in range(repeats):
            with factory() as session:
                decided = session.scalars(select(RolloutDecision.at).where(
                    RolloutDecision.rollout_id == rollout_id, RolloutDecision.wave_index == wave,
                    RolloutDecision.decision == "promote")).first()
                rollout = session.get(Rollout, rollout_id)
                rollout.current_wave, rollout.wave_started_at = wave, wave_started_at  # as it was then; rolled back
                members = session.query(RolloutMember).filter(RolloutMember.rollout_id == rollout_id,
                                                              RolloutMember.wave_index <= wave).count()
                c0, w0 = time.thread_time(), time.perf_counter()
                verdict = evaluate_gates(session, rollout, wave, decided)
                cpu.append(time.thread_time() - c0)
                wall.append(time.perf_counter() - w0)
                session.rollback()
        for check in verdict.evidence.get("checks", []):
            windows = max(windows, int(check.get("windows") or 0) + int(check.get("control_windows") or 0))
    finally:
        engine.dispose()
    return {"cpu_s": statistics.median(cpu[1:] or cpu), "wall_s": statistics.median(wall[1:] or wall),
            "cold_cpu_s": cpu[0], "decision": verdict.decision,
            "members": members, "treatment_windows": windows}


def rollout_round(root: Path, db_url: str, args, private_key: Path, public_key: Path) -> dict[str, Any]:
    from sqlalchemy import text

    from builder.cache import default_cache_dir
    from fleet.db import make_engine
    from testbeds.fleet_harness import build_release

    waves = [float(w) for w in args.waves.split(",")]
    v1 = build_release(root, private_key, "1.0.0", ["rpi5"], cache_dir=default_cache_dir())[0]
    v2 = build_release(root, private_key, "2.0.0", ["rpi5"], cache_dir=default_cache_dir())[0]
    device_ids = [f"sim-{i:05d}" for i in range(args.devices)]
    with MosquittoBroker(secure=False, extra_config=BROKER_CONFIG) as broker:
        carry = broker_carry_rate(broker.url, args.devices)
        print(f"  the broker carried {carry:.0f} desired states/s (one out, two statuses back) to {args.devices} "
              "lite devices", flush=True)
        fleets = start_replicas(root, broker.url, db_url, public_key, 1)
        fleet = fleets[0]
        engine = make_engine(db_url)
        devices = None
        try:
            client = fleet.client()
            old = client.upload(v1)["id"]
            new = client.upload(v2)["id"]
            enroll(db_url, device_ids, bundle_id=old, labels={"site": "bench"})
            devices = LiteFleet(broker.url, device_ids, bundle_id=old, telemetry_every_s=args.telemetry_every,
                                window=lambda d, n, bundle: window_payload(d, n, bundle)).start()
            print(f"  {args.devices} lite devices connected, one window every {args.telemetry_every:.0f} s each; "
                  f"warming up {args.telemetry_every:.0f} s", flush=True)
            time.sleep(args.telemetry_every)  # every device has reported on the old bundle
            metric_before = histogram_metric(fleet, "edgepack_wave_evaluation_cpu_seconds")
            gates = ["install_failure_ratio<=0.02", "active_ratio>=0.99", "p95_latency_ms<=1.3x control", "error_rate<=0.05"]
            started = time.monotonic()
            rollout = client.request("POST", "/rollouts", json={
                "bundle_id": new, "selector": {"site": "bench"}, "waves": waves, "gates": gates, "bake_s": args.bake,
                "min_reports": 1, "install_timeout_s": 600})
            rollout_id = rollout["id"]
            wave_started: dict[int, tuple[float, dt.datetime]] = {}
            all_active: dict[int, float] = {}
            status = "pending"
            deadline = time.monotonic() + 60 * 60
            while time.monotonic() < deadline:
                with engine.connect() as connection:
                    row = connection.execute(text("SELECT status, current_wave, wave_started_at FROM rollouts WHERE id = :id"),
                                             {"id": rollout_id}).one()
                    counts = connection.execute(text(
                        "SELECT wave_index, count(*), count(*) FILTER (WHERE phase = 'active') FROM rollout_members "
                        "WHERE rollout_id = :id GROUP BY wave_index"), {"id": rollout_id}).all()
                now = time.monotonic()
                status, wave, wave_at = row
                if wave is not None and wave >= 0 and wave_at is not None and wave not in wave_started:
                    wave_started[wave] = (now, wave_at)
                for wave_index, members, active in counts:
                    if wave_index in wave_started and members and active == members and wave_index not in all_active:
                        all_active[wave_index] = now
                if status in ("succeeded", "rolled_back", "paused", "aborted"):
                    break
                time.sleep(0.25)
            wait_for(lambda: all(b == new for b in devices.current_bundles().values()), 120, what="every device on the new bundle")
            finished = time.monotonic()
            metric_after = histogram_metric(fleet, "edgepack_wave_evaluation_cpu_seconds")
            with engine.connect() as connection:
                wave_of = dict(connection.execute(text(
                    "SELECT device_id, wave_index FROM rollout_members WHERE rollout_id = :id"), {"id": rollout_id}).all())
            sizes: dict[int, int] = {}
            for wave_index in wave_of.values():
                sizes[wave_index] = sizes.get(wave_index, 0) + 1
            desired = devices.desired_by_device()
        finally:
            if devices is not None:
                devices.stop()
            engine.dispose()
            for f in fleets:
                f.stop()
    # on a quiet host: everything but the database has stopped
    replay = replay_promoting_look(db_url, rollout_id, 0, wave_started[0][1], repeats=5) if 0 in wave_started else None
    per_wave = []
    arrivals: dict[int, list[float]] = {}  # wave -> when its members' desired state arrived (wall clock)
    for device_id, by_seq in desired.items():
        if device_id in wave_of and by_seq:
            arrivals.setdefault(wave_of[device_id], []).append(min(by_seq.values()))
    for wave_index in sorted(sizes):
        members = sizes[wave_index]
        began = wave_started.get(wave_index, (None, None))[0]
        acked = all_active.get(wave_index)
        times = sorted(arrivals.get(wave_index, []))
        per_wave.append({"wave": wave_index, "members": members,
                         "delivered_per_s": len(times) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None,
                         "acked_per_s": members / (acked - began) if began and acked and acked > began else None})
    count = metric_after["count"] - metric_before["count"]
    cpu_sum = metric_after["sum"] - metric_before["sum"]
    under_1s = metric_after.get("le_1.0", 0) - metric_before.get("le_1.0", 0)
    lower_bound = args.bake * len(waves) + args.devices / carry
    total = finished - started
    return {"status": status, "total_s": total, "lower_bound_s": lower_bound, "ratio": total / lower_bound,
            "carry": carry, "per_wave": per_wave, "evaluations": count,
            "evaluation_mean_cpu_s": cpu_sum / count if count else None, "evaluations_under_1s": under_1s,
            "replay": replay}


def fresh_database(args, server_url: str | None, index: int, root: Path) -> str:
    if args.sqlite:
        return f"sqlite:///{root / f'fleet-{index}.db'}"
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"edgepack_bench_{uuid.uuid4().hex[:8]}"
    admin = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def print_ingest(results: dict[int, list[dict[str, Any]]], args, drain: bool = False) -> None:
    replica_counts = list(results)
    engine = "SQLite" if args.sqlite else "PostgreSQL"
    what = ("a backlog drained (replicas paused while the devices published; stored/s from their resume)" if drain
            else "live ingestion (the replicas store while the devices publish)")
    print(f"\n{what} on {engine}, {args.devices} devices, {args.windows} windows, median of {args.rounds} round(s):")
    print(f"  {'replicas':>8} {'bare/s':>8} {'stored/s':>9} {'vs bare':>8} {'vs 1':>6} {'dups':>5} {'lost':>5}")
    one = statistics.median(r["fleet_rate"] for r in results[replica_counts[0]])
    for replicas in replica_counts:
        rows = results[replicas]
        stored = statistics.median(r["fleet_rate"] for r in rows)
        print(f"  {replicas:>8} {statistics.median(r['bare_rate'] for r in rows):>8.0f} {stored:>9.0f} "
              f"{statistics.median(r['ratio'] for r in rows):>8.2f} {stored / one:>6.2f} "
              f"{sum(r['dups'] for r in rows):>5} {sum(r['lost'] for r in rows):>5}")
    print("  (issue 12: one replica on PostgreSQL >= 0.5x bare; two replicas >= 1.6x one)")


def print_rollout(result: dict[str, Any], args) -> None:
    print(f"\nrollout of {args.devices} devices, waves {args.waves} + hold-back, bake {args.bake:.0f} s: {result['status']}")
    def rate(value: float | None) -> str:
        return f"{value:.0f}/s" if value else "-"

    for wave in result["per_wave"]:
        print(f"  wave {wave['wave']}: {wave['members']} members; desired states delivered at {rate(wave['delivered_per_s'])} "
              f"(first to last arrival), acknowledged at {rate(wave['acked_per_s'])} (wave start → every member "
              "stored active)")
    print(f"  broker carry (bare publisher, as many devices): {result['carry']:.0f}/s")
    if result["evaluations"]:
        print(f"  wave evaluation in the fleet, every tick of the rollout (all waves): {result['evaluations']:.0f} evaluations, "
              f"mean {result['evaluation_mean_cpu_s']:.3f} s CPU, {result['evaluations_under_1s']:.0f} of them under 1 s")
    replay = result["replay"]
    if replay:
        print(f"  the look that promoted the first wave ({replay['members']} of {args.devices} devices, "
              f"{replay['treatment_windows']} windows on both sides), replayed: {replay['cpu_s']:.3f} s CPU, "
              f"{replay['wall_s']:.3f} s wall ({replay['decision']}; a cold first call {replay['cold_cpu_s']:.3f} s)  "
              "(issue 12: under 1 s of fleet CPU)")
    print(f"  rollout time {result['total_s']:.1f} s, lower bound {result['lower_bound_s']:.1f} s (bake x waves + "
          f"devices / broker carry) = {result['ratio']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--windows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--parts", default="ingest,drain,rollout", help="ingest, drain, rollout: any of them.")
    parser.add_argument("--sqlite", action="store_true", help="SQLite in the fleet's data folder instead of PostgreSQL.")
    parser.add_argument("--db-url", help="An existing PostgreSQL server (a database is created per round).")
    parser.add_argument("--replicas", default="1,2,3", help="Fleet replica counts to compare (shared subscriptions).")
    parser.add_argument("--bake", type=float, default=60.0)
    parser.add_argument("--waves", default="10,100")
    parser.add_argument("--telemetry-every", type=float, default=30.0, help="Seconds between two windows of a device.")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    replica_counts = [int(n) for n in args.replicas.split(",") if n.strip()]
    if args.sqlite and (max(replica_counts) > 1 or "rollout" in parts):
        parser.error("replicas and the rollout part need PostgreSQL: SQLite serves one process")

    with tempfile.TemporaryDirectory(prefix="edgepack-bench-scale-") as tmp:
        root = Path(tmp)
        private_key, public_key = generate_keypair(root / "keys")
        server = None
        server_url = args.db_url
        if not args.sqlite and not server_url:
            from testbeds.postgres import PostgresServer

            server = PostgresServer().start()
            server_url = server.url
        try:
            index = 0
            for part in ("ingest", "drain"):
                if part not in parts:
                    continue
                results: dict[int, list[dict[str, Any]]] = {n: [] for n in replica_counts}
                for round_no in range(args.rounds):
                    for replicas in replica_counts:  # interleaved: a busy host hits every replica count alike
                        db_url = fresh_database(args, server_url, index, root)
                        round_root = root / f"round-{index}"
                        round_root.mkdir()
                        index += 1
                        result = ingest_round(round_root, db_url, args, public_key, replicas, drain=part == "drain")
                        results[replicas].append(result)
                        print(f"[{part} round {round_no + 1}/{args.rounds}, {replicas} replica(s)] {result['windows']} windows from "
                              f"{args.devices} devices: bare {result['bare_rate']:.0f}/s, fleet stored {result['fleet_rate']:.0f}/s, "
                              f"ratio {result['ratio']:.2f}, dups {result['dups']}, lost {result['lost']}", flush=True)
                print_ingest(results, args, drain=part == "drain")
            if "rollout" in parts:
                db_url = fresh_database(args, server_url, index, root)
                round_root = root / "rollout"
                round_root.mkdir()
                print(f"\n[rollout] {args.devices} devices", flush=True)
                print_rollout(rollout_round(round_root, db_url, args, private_key, public_key), args)
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
