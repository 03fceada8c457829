"""Retention (issue 12): raw telemetry windows older than the period are rolled up hourly per bundle and
profile and deleted; the aggregates keep the numbers (counts, merged histogram, drift) and a rollout's
evidence stays readable; the aggregates themselves age out after their own period."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import func, select, text

from edgepack.histogram import LatencyHistogram
from edgepack.protocol import Telemetry
from fleet.models import Rollout, RolloutDecision, TelemetryRollup, TelemetryWindow
from fleet.services.retention import bundle_rollups, prune_telemetry
from fleet.services.status import record_telemetry
from tests.fleet.rollout_helpers import add_bundle, add_device
from tests.support import run_cli

NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)


def _latency(values_ms: list[float]) -> dict:
    histogram = LatencyHistogram()
    for value in values_ms:
        histogram.add(value)
    return histogram.summary().model_dump()


def _store(session, device_id: str, bundle_id: str, at: dt.datetime, latencies: list[float], errors: int = 0,
           drift: float | None = None) -> None:
    record_telemetry(session, Telemetry(device_id=device_id, window_id=f"{device_id}-{at.timestamp()}",
                                        bundle_id=bundle_id, window_s=10, inferences=len(latencies), errors=errors,
                                        latency_ms=_latency(latencies), drift={"input": drift} if drift is not None else {}),
                     now=at)


@pytest.fixture
def database(migrated_factory):
    factory = migrated_factory
    with factory() as session:
        bundle = add_bundle(session, "det", "2.0", "rpi5")
        for device_id in ("rpi-1", "rpi-2"):
            add_device(session, device_id, "rpi5")
        add_device(session, "x86-1", "x86-avx2")
        old = NOW - dt.timedelta(days=40)
        for minute in (0, 20, 40):  # three windows in one old hour per device
            _store(session, "rpi-1", bundle.id, old + dt.timedelta(minutes=minute), [10.0] * 95 + [50.0] * 5, errors=1,
                   drift=0.1)
            _store(session, "rpi-2", bundle.id, old + dt.timedelta(minutes=minute), [12.0] * 100, drift=0.3)
        _store(session, "x86-1", bundle.id, old + dt.timedelta(hours=1), [3.0] * 50)
        _store(session, "rpi-1", bundle.id, NOW - dt.timedelta(days=1), [11.0] * 100)  # recent: stays raw
        session.add(Rollout(id="r-old", bundle_id=bundle.id, waves=[10, 100], gates=["p95_latency_ms<=1.3x control"],
                            status="succeeded", created_by="test", created_at=old))
        session.flush()
        session.add(RolloutDecision(rollout_id="r-old", wave_index=0, decision="promote", at=old,
                                    evidence={"checks": [{"profile": "rpi5", "metric": "p95_latency_ms", "outcome": "pass",
                                                          "test": {"estimate": 1.01, "low": 0.97, "high": 1.05}}]}))
        session.commit()
    return factory, bundle.id


def test_old_windows_are_rolled_up_then_deleted_and_recent_ones_stay(database):
    factory, bundle_id = database
    with factory() as session:
        result = prune_telemetry(session, raw_days=30, rollup_days=400, now=NOW, chunk=4)  # chunks of 4: resumes across them
    assert (result.windows_rolled_up, result.windows_deleted, result.rollups_written) == (7, 7, 2)
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(TelemetryWindow)) == 1  # the recent one
        rollups = bundle_rollups(session, bundle_id)
        # a rollout's evidence outlives its raw windows
        evidence = session.scalars(select(RolloutDecision.evidence).where(RolloutDecision.rollout_id == "r-old")).one()
        assert evidence["checks"][0]["test"]["high"] == 1.05
    by_profile = {r["profile"]: r for r in rollups}
    rpi = by_profile["rpi5"]
    assert (rpi["windows"], rpi["inferences"], rpi["errors"]) == (6, 600, 3)
    assert rpi["error_rate"] == pytest.approx(3 / 600)
    # p95 of the merged histogram: 585 of 600 answers at 10-12 ms, 15 at 50 ms -> within the 12 ms bucket
    assert 9.0 < rpi["latency_ms"]["p50"] < 13.0 and 9.0 < rpi["latency_ms"]["p95"] < 14.5
    assert 40.0 < rpi["latency_ms"]["p99"] < 61.0
    assert rpi["drift"]["input"]["mean"] == pytest.approx(0.2) and rpi["drift"]["input"]["max"] == pytest.approx(0.3)
    assert by_profile["x86-avx2"]["windows"] == 1 and by_profile["x86-avx2"]["drift"] == {}

    with factory() as session:  # a second pass finds nothing more to do
        again = prune_telemetry(session, raw_days=30, rollup_days=400, now=NOW)
    assert (again.windows_deleted, again.rollups_written, again.rollups_deleted) == (0, 0, 0)

    with factory() as session:  # the rollups age out after their own period
        late = prune_telemetry(session, raw_days=30, rollup_days=10, now=NOW)
        assert late.rollups_deleted == 2 and session.scalar(select(func.count()).select_from(TelemetryRollup)) == 0


def test_windows_of_the_same_hour_pruned_in_two_passes_add_up_in_one_rollup(database):
    factory, bundle_id = database
    with factory() as session:
        prune_telemetry(session, raw_days=30, rollup_days=400, now=NOW)
        device = "rpi-2"
        late = NOW - dt.timedelta(days=40) + dt.timedelta(minutes=50)  # the same old hour, reported later
        _store(session, device, bundle_id, late, [12.0] * 100, drift=0.3)
        prune_telemetry(session, raw_days=30, rollup_days=400, now=NOW)
        rpi = next(r for r in bundle_rollups(session, bundle_id) if r["profile"] == "rpi5")
    assert (rpi["windows"], rpi["inferences"]) == (7, 700)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_prune_command_reports_what_it_did_and_the_api_shows_the_rollups(database, tmp_path, db_url, start_fleet):
    factory, bundle_id = database
    result = run_cli("fleet", "prune", "--db-url", db_url, "--telemetry-retention-days", "30", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["windows_deleted"] == 7 and report["rollups_written"] == 2
    fleet = start_fleet(db_url=db_url)
    rows = fleet.admin.get(f"/api/v1/bundles/{bundle_id}/telemetry").json()
    assert {r["profile"] for r in rows} == {"rpi5", "x86-avx2"} and sum(r["windows"] for r in rows) == 7
    assert fleet.admin.get(f"/api/v1/bundles/{'0' * 64}/telemetry").status_code == 404


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_on_postgresql_a_day_past_retention_is_rolled_up_and_its_partition_dropped(migrated_factory):
    """Telemetry on PostgreSQL is partitioned by day: a day that ended before the cutoff goes whole (rolled up,
    then DROP of its partition, no row deleted one by one); the boundary day and the recent ones stay."""
    from fleet import partitions

    factory = migrated_factory
    old_day = (NOW - dt.timedelta(days=45)).date()
    boundary = (NOW - dt.timedelta(days=30, hours=6))  # before the cutoff, but its day ends after it
    with factory() as session:
        connection = session.connection()
        assert partitions.is_partitioned(connection)
        partitions.ensure_partitions(connection, old_day, old_day + dt.timedelta(days=1))
        partitions.ensure_partitions(connection, boundary.date(), boundary.date())
        session.commit()
        bundle = add_bundle(session, "det", "2.0", "rpi5")
        add_device(session, "rpi-1", "rpi5")
        start = dt.datetime.combine(old_day, dt.time(10), tzinfo=dt.timezone.utc)
        for minute in range(0, 60, 10):  # six windows of one old hour, in the old day's partition
            _store(session, "rpi-1", bundle.id, start + dt.timedelta(minutes=minute), [10.0] * 100, errors=1)
        _store(session, "rpi-1", bundle.id, boundary, [20.0] * 100)
        _store(session, "rpi-1", bundle.id, NOW - dt.timedelta(days=1), [11.0] * 100)
        held = {name for name, in session.execute(text(
            "SELECT tableoid::regclass::text FROM telemetry")).all()}
        assert f'{partitions.SCHEMA}.{partitions.partition_for(old_day).name}' in held

    with factory() as session:
        result = prune_telemetry(session, raw_days=30, rollup_days=400, now=NOW)
        names = {p.name for p in partitions.day_partitions(session.connection())}
        remaining = session.scalars(select(TelemetryWindow.received_at).order_by(TelemetryWindow.received_at)).all()
        rollups = bundle_rollups(session, bundle.id)
    assert result.partitions_dropped[0] == partitions.partition_for(old_day).name
    assert partitions.partition_for(old_day).name not in names and partitions.partition_for(boundary.date()).name in names
    assert result.windows_rolled_up == 6
    assert [utc_at.astimezone(dt.timezone.utc) for utc_at in remaining] == [boundary, NOW - dt.timedelta(days=1)]
    assert len(rollups) == 1 and (rollups[0]["windows"], rollups[0]["inferences"], rollups[0]["errors"]) == (6, 600, 6)
    # the days ahead exist, so new windows never land in the default partition
    assert {partitions.partition_for((NOW + dt.timedelta(days=d)).date()).name for d in range(4)} <= names


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_on_postgresql_a_redelivered_window_is_one_row_across_partitions_and_a_held_day_is_not_partitioned(migrated_factory):
    from fleet import partitions

    factory = migrated_factory
    with factory() as session:
        bundle = add_bundle(session, "det", "2.0", "rpi5")
        add_device(session, "rpi-1", "rpi5")
        window = Telemetry(device_id="rpi-1", window_id="w-1", bundle_id=bundle.id, window_s=10, inferences=5, errors=0,
                           latency_ms=_latency([3.0] * 5))
        far = NOW - dt.timedelta(days=300)  # no partition for that day: the default partition takes it
        assert record_telemetry(session, window, now=far) is not None
        # the same window redelivered a day later is still the same window (found in another partition)
        assert record_telemetry(session, window, now=NOW) is None
        assert session.scalar(select(func.count()).select_from(TelemetryWindow)) == 1
        created = partitions.ensure_partitions(session.connection(), far.date(), far.date())
        assert created == []  # the default holds that day's row: PostgreSQL would refuse the partition
        session.commit()
