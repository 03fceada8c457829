"""Fleet scale benchmark, ingestion: how fast `edgepack fleet serve` stores telemetry, against what a bare paho
subscriber receives of the same messages in the same run.

Each round starts a fresh Mosquitto, a fresh PostgreSQL database (a throwaway server from
testbeds/postgres.py unless --db-url names one; --sqlite for SQLite) and one fleet server; enrolls --devices
devices (rows in the fleet's database, as enrollment leaves them); connects every device on its own MQTT
connection and has each publish its share of --windows valid telemetry windows (about 925 bytes each, QoS 1)
as fast as it can. A bare paho subscriber on the same topics counts what it receives. Printed per round and as
medians:

  bare     windows/s the bare subscriber received (first publish → its last message)
  fleet    windows/s the fleet stored (first publish → the last row committed, counted in the database)
  ratio    fleet / bare          (issue 12: at least 0.5 on PostgreSQL with one fleet process)
  vs 1     stored rate of R replicas (`--replicas 1,2,3`, one shared subscription group) / one replica's
  dups     rows beyond the windows sent (must be 0), lost: windows sent but not stored (must be 0)

Numbers are printed, never asserted.

    python benchmarks/bench_fleet_scale.py [--devices 200] [--windows 5000] [--rounds 3] [--replicas 1,2,3] [--sqlite] [--db-url URL]
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
from edgepack.protocol import Telemetry, encode, telemetry_topic  # noqa: E402
from edgepack.signing import generate_keypair  # noqa: E402
from testbeds.fleet_harness import FleetProcess, wait_for  # noqa: E402
from testbeds.mosquitto import MosquittoBroker  # noqa: E402


def window_payload(device_id: str, n: int) -> bytes:
    """A realistic window: a full latency histogram and a few drift scores (~925 bytes)."""
    histogram = LatencyHistogram()
    for i in range(40):
        histogram.add(2.0 + (i % 7) * 0.4 + n % 3)
    return encode(Telemetry(device_id=device_id, window_id=uuid.uuid4().hex, bundle_id="ab" * 32, window_s=10.0,
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


def enroll(db_url: str, device_ids: list[str]) -> None:
    from sqlalchemy import insert

    from fleet.db import make_engine
    from fleet.models import Device

    engine = make_engine(db_url)
    with engine.begin() as connection:
        connection.execute(insert(Device), [dict(id=d, profile="rpi5", labels={}, credential_hash=secrets.token_hex(32),
                                                 online=False, phase="idle", acked_seq=0, desired_seq=0,
                                                 enrolled_at=dt.datetime.now(dt.timezone.utc)) for d in device_ids])
    engine.dispose()


def stored_rows(engine) -> int:
    from sqlalchemy import func, select

    from fleet.models import TelemetryWindow

    with engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(TelemetryWindow))


def publish_all(url: str, device_ids: list[str], per_device: int) -> list[Any]:
    """Connect every device on its own connection, then have all publish their windows at once."""
    import paho.mqtt.client as mqtt

    from fleet.mqtt_bridge import parse_mqtt_url

    endpoint = parse_mqtt_url(url)
    clients = []
    for device_id in device_ids:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        client.max_inflight_messages_set(100)
        client.connect(endpoint["host"], endpoint["port"])
        client.loop_start()
        clients.append(client)
    payloads = {d: [window_payload(d, n) for n in range(per_device)] for d in device_ids}
    return [clients, payloads]


def run_round(root: Path, db_url: str, args, public_key: Path, replicas: int) -> dict[str, Any]:
    from fleet.db import make_engine

    per_device = max(1, args.windows // args.devices)
    total = per_device * args.devices
    device_ids = [f"sim-{i:05d}" for i in range(args.devices)]
    with MosquittoBroker(secure=False, extra_config="max_inflight_messages 1000\n") as broker:
        fleets = []
        for i in range(replicas):
            fleet = FleetProcess(root, broker.url, trusted_key=public_key, db_url=db_url,
                                 extra_args=["--mqtt-client-id", f"fleet-{i}-{secrets.token_hex(3)}"]
                                 + (["--mqtt-share-group", "bench"] if replicas > 1 else []))
            fleet.log_path = root / f"fleet-{i}.log"
            fleets.append(fleet.start())
        engine = make_engine(db_url)
        try:
            enroll(db_url, device_ids)
            bare = BareSubscriber(broker.url)
            assert bare.ready.wait(10), "the bare subscriber did not subscribe"
            time.sleep(1.0)  # the fleet's bridge is subscribed (it was healthy before we enrolled)
            clients, payloads = publish_all(broker.url, device_ids, per_device)
            started = time.monotonic()

            def device_loop(client, device_id):
                infos = [client.publish(telemetry_topic(device_id), p, qos=1) for p in payloads[device_id]]
                for info in infos:
                    info.wait_for_publish(60)

            threads = [threading.Thread(target=device_loop, args=(c, d)) for c, d in zip(clients, device_ids)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            published = time.monotonic()
            wait_for(lambda: bare.count >= total, 120, interval_s=0.01, what="the bare subscriber to receive every window")
            bare_done = bare.last
            last_count, stored_at = 0, time.monotonic()
            deadline = time.monotonic() + 300
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
            for client in clients:
                client.disconnect()
                client.loop_stop()
            bare.close()
        finally:
            engine.dispose()
            for fleet in fleets:
                fleet.stop()
    bare_rate = total / max(bare_done - started, 1e-9)
    fleet_rate = min(final, total) / max(stored_at - started, 1e-9)
    return {"replicas": replicas, "windows": total, "published_s": published - started, "bare_rate": bare_rate, "fleet_rate": fleet_rate,
            "ratio": fleet_rate / bare_rate, "dups": max(0, final - total), "lost": max(0, total - final)}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--windows", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sqlite", action="store_true", help="SQLite in the fleet's data folder instead of PostgreSQL.")
    parser.add_argument("--db-url", help="An existing PostgreSQL server (a database is created per round).")
    parser.add_argument("--replicas", default="1", help="Fleet replica counts to compare, e.g. 1,2,3 (shared subscriptions).")
    args = parser.parse_args()
    replica_counts = [int(n) for n in args.replicas.split(",") if n.strip()]
    if args.sqlite and max(replica_counts) > 1:
        parser.error("replicas need PostgreSQL: SQLite serves one process")

    with tempfile.TemporaryDirectory(prefix="edgepack-bench-scale-") as tmp:
        root = Path(tmp)
        _, public_key = generate_keypair(root / "keys")
        server = None
        server_url = args.db_url
        if not args.sqlite and not server_url:
            from testbeds.postgres import PostgresServer

            server = PostgresServer().start()
            server_url = server.url
        try:
            results: dict[int, list[dict[str, Any]]] = {n: [] for n in replica_counts}
            index = 0
            for round_no in range(args.rounds):
                for replicas in replica_counts:  # interleaved: a busy host hits every replica count alike
                    db_url = fresh_database(args, server_url, index, root)
                    round_root = root / f"round-{index}"
                    round_root.mkdir()
                    index += 1
                    result = run_round(round_root, db_url, args, public_key, replicas)
                    results[replicas].append(result)
                    print(f"[round {round_no + 1}/{args.rounds}, {replicas} replica(s)] {result['windows']} windows from "
                          f"{args.devices} devices: bare {result['bare_rate']:.0f}/s, fleet stored {result['fleet_rate']:.0f}/s, "
                          f"ratio {result['ratio']:.2f}, dups {result['dups']}, lost {result['lost']}", flush=True)
        finally:
            if server is not None:
                server.stop()
    engine = "SQLite" if args.sqlite else "PostgreSQL"
    print(f"\ningestion on {engine}, {args.devices} devices, {args.windows} windows, median of {args.rounds} rounds:")
    print(f"  {'replicas':>8} {'bare/s':>8} {'stored/s':>9} {'vs bare':>8} {'vs 1':>6} {'dups':>5} {'lost':>5}")
    one = statistics.median(r["fleet_rate"] for r in results[replica_counts[0]])
    for replicas in replica_counts:
        rows = results[replicas]
        stored = statistics.median(r["fleet_rate"] for r in rows)
        print(f"  {replicas:>8} {statistics.median(r['bare_rate'] for r in rows):>8.0f} {stored:>9.0f} "
              f"{statistics.median(r['ratio'] for r in rows):>8.2f} {stored / one:>6.2f} "
              f"{sum(r['dups'] for r in rows):>5} {sum(r['lost'] for r in rows):>5}")
    print("  (issue 12: one replica on PostgreSQL >= 0.5x bare; two replicas >= 1.6x one)")


if __name__ == "__main__":
    main()
