"""Keeping the database bounded: raw telemetry windows for a while, hourly aggregates for much longer.

Every telemetry window older than `raw_days` is first folded into `telemetry_rollups` — one row per bundle,
hardware profile and hour: windows, inferences, errors, the merged latency histogram (the shared 64 buckets,
so quantiles stay computable), and per drift name the sum and count of scores (the mean) and the maximum —
then deleted, in chunks of `chunk` windows, one transaction each, so a large backlog never holds a long lock
and an interrupted run resumes where it stopped (a chunk is rolled up and deleted in the same transaction, so
no window is counted twice). Rollups older than `rollup_days` are deleted too.

On PostgreSQL the telemetry table is partitioned by day (fleet.partitions) and a day goes whole: once the
day ended before the cutoff its windows are rolled up and its partition dropped in one transaction. Raw
windows are then kept between `raw_days` and a day more; no row is deleted one by one, so the table never
bloats. Only rows in the default partition (days without a partition) are deleted in chunks, as on SQLite.

What a rollout decided, and on what evidence, lives in the rollout's waves (`waves.evidence`), not in the
raw windows: a year-old rollout's evidence stays readable after its windows are gone.

`prune_telemetry` is run by the fleet server's maintenance thread (fleet.mqtt_bridge.lifespan_hook, every
`maintenance_interval_s`) and by `edgepack fleet prune`.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from edgepack.histogram import LATENCY_BOUNDS_MS, merge_counts, quantile
from fleet import partitions
from fleet.models import Device, TelemetryRollup, TelemetryWindow
from fleet.services.gates import utc, window_histogram

log = logging.getLogger(__name__)

DAY_S = 86_400.0


@dataclass(frozen=True)
class PruneResult:
    windows_rolled_up: int
    windows_deleted: int
    rollups_written: int
    rollups_deleted: int
    raw_cutoff: dt.datetime
    rollup_cutoff: dt.datetime
    partitions_dropped: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"windows_rolled_up": self.windows_rolled_up, "windows_deleted": self.windows_deleted,
                "rollups_written": self.rollups_written, "rollups_deleted": self.rollups_deleted,
                "partitions_dropped": list(self.partitions_dropped),
                "raw_cutoff": self.raw_cutoff.isoformat(), "rollup_cutoff": self.rollup_cutoff.isoformat()}


def _hour(at: dt.datetime) -> dt.datetime:
    at = utc(at)
    return at.replace(minute=0, second=0, microsecond=0)


def _histogram(window: TelemetryWindow) -> list[int] | None:
    """The window's latency counts when they are on the shared buckets (else it adds no histogram)."""
    wire = window_histogram(window)
    if wire is None or len(wire[0]) != len(LATENCY_BOUNDS_MS):
        return None
    bounds, counts = wire
    if any(abs(a - b) > 1e-9 * max(1.0, b) for a, b in zip(bounds, LATENCY_BOUNDS_MS)):
        return None
    return counts


class _Accumulator:
    def __init__(self) -> None:
        self.windows = 0
        self.inferences = 0
        self.errors = 0
        self.counts: list[int] | None = None
        self.drift: dict[str, dict[str, float]] = {}

    def add_window(self, window: TelemetryWindow) -> None:
        self.windows += 1
        self.inferences += window.inferences
        self.errors += window.errors
        counts = _histogram(window)
        if counts is not None:
            self.counts = counts if self.counts is None else merge_counts([self.counts, counts])
        for name, score in (window.drift or {}).items():
            if isinstance(score, (int, float)) and math.isfinite(score):
                entry = self.drift.setdefault(str(name), {"sum": 0.0, "n": 0, "max": float(score)})
                entry["sum"] += float(score)
                entry["n"] += 1
                entry["max"] = max(entry["max"], float(score))

    def merge_into(self, rollup: TelemetryRollup) -> None:
        rollup.windows += self.windows
        rollup.inferences += self.inferences
        rollup.errors += self.errors
        if self.counts is not None:
            rollup.latency_counts = (self.counts if not rollup.latency_counts
                                     else merge_counts([rollup.latency_counts, self.counts]))
        drift = {name: dict(entry) for name, entry in (rollup.drift or {}).items()}
        for name, entry in self.drift.items():
            old = drift.get(name)
            drift[name] = dict(entry) if old is None else {
                "sum": old["sum"] + entry["sum"], "n": old["n"] + entry["n"], "max": max(old["max"], entry["max"])}
        rollup.drift = drift


Groups = dict[tuple[str | None, str, dt.datetime], _Accumulator]


def _grouped(rows: Any) -> tuple[Groups, int]:
    """(window, profile) rows summed per bundle, profile and hour; and how many rows there were."""
    groups: Groups = {}
    count = 0
    for window, profile in rows:
        groups.setdefault((window.bundle_id, profile, _hour(window.received_at)), _Accumulator()).add_window(window)
        count += 1
    return groups, count


def _merge_groups(session: Session, groups: Groups) -> int:
    """Add the groups to their hour's rollups (creating those missing); returns how many were created."""
    written = 0
    for (bundle_id, profile, hour), acc in groups.items():
        bundle_match = TelemetryRollup.bundle_id.is_(None) if bundle_id is None else TelemetryRollup.bundle_id == bundle_id
        rollup = session.scalars(select(TelemetryRollup).where(
            bundle_match, TelemetryRollup.profile == profile, TelemetryRollup.hour == hour)).first()
        if rollup is None:
            rollup = TelemetryRollup(bundle_id=bundle_id, profile=profile, hour=hour, windows=0, inferences=0,
                                     errors=0, latency_counts=None, drift={})
            session.add(rollup)
            written += 1
        acc.merge_into(rollup)
    session.flush()
    return written


def _windows_of(where: Any):
    return (select(TelemetryWindow, Device.profile).join(Device, Device.id == TelemetryWindow.device_id).where(where))


def _drop_old_partitions(session: Session, raw_cutoff: dt.datetime, chunk: int) -> tuple[int, int, list[str]]:
    """PostgreSQL: every day partition that ended before `raw_cutoff` is rolled up and dropped, one
    transaction each (its rollups and the drop commit together: an interrupted pass leaves the day whole)."""
    rolled = written = 0
    dropped: list[str] = []
    for partition in partitions.day_partitions(session.connection()):
        if partition.end > raw_cutoff:
            break
        groups, count = _grouped(session.execute(_windows_of(partitions.in_partition(partition.name))
                                                 .execution_options(yield_per=chunk)))
        rolled += count
        written += _merge_groups(session, groups)
        partitions.drop_partition(session.connection(), partition)
        session.commit()
        dropped.append(partition.name)
    return rolled, written, dropped


def prune_telemetry(session: Session, *, raw_days: float, rollup_days: float, now: float | dt.datetime | None = None,
                    chunk: int = 5000) -> PruneResult:
    """Roll up and delete the windows older than `raw_days`, delete rollups older than `rollup_days`.

    On PostgreSQL telemetry is partitioned by day (fleet.partitions): the pass first creates the partitions
    of the days ahead, then rolls up and drops every day that ended before the cutoff; windows go a whole
    day at a time (kept up to a day longer than `raw_days`). Only the default partition's old rows, and
    SQLite's, are deleted row by row."""
    at = utc(time.time() if now is None else now)
    raw_cutoff = at - dt.timedelta(seconds=raw_days * DAY_S)
    rollup_cutoff = at - dt.timedelta(seconds=rollup_days * DAY_S)
    rolled = deleted = written = 0
    dropped: list[str] = []
    old = TelemetryWindow.received_at < raw_cutoff
    if partitions.is_partitioned(session.connection()):
        partitions.ensure_ahead(session.connection(), today=at.date())
        session.commit()
        rolled, written, dropped = _drop_old_partitions(session, raw_cutoff, chunk)
        deleted = rolled
        old = old & partitions.in_partition(partitions.DEFAULT)
    while True:
        rows = session.execute(_windows_of(old).order_by(TelemetryWindow.id).limit(chunk)).all()
        if not rows:
            break
        written += _merge_groups(session, _grouped(rows)[0])
        ids = [window.id for window, _ in rows]
        session.execute(delete(TelemetryWindow).where(TelemetryWindow.id.in_(ids)).execution_options(synchronize_session=False))
        session.commit()  # this chunk's rollups and its deletion together
        rolled += len(rows)
        deleted += len(ids)
        if len(rows) < chunk:
            break
    gone = session.execute(delete(TelemetryRollup).where(TelemetryRollup.hour < rollup_cutoff)
                           .execution_options(synchronize_session=False)).rowcount or 0
    session.commit()
    return PruneResult(windows_rolled_up=rolled, windows_deleted=deleted, rollups_written=written,
                       rollups_deleted=gone, raw_cutoff=raw_cutoff, rollup_cutoff=rollup_cutoff,
                       partitions_dropped=tuple(dropped))


def rollup_summary(rollup: TelemetryRollup) -> dict[str, Any]:
    """One rollup as the API shows it: totals, the error rate, p50/p95/p99 from the merged histogram and the
    mean and maximum drift per name."""
    counts = rollup.latency_counts or None
    latency: dict[str, float | None] = {}
    if counts and sum(counts):
        for q in (0.5, 0.95, 0.99):
            value = quantile(LATENCY_BOUNDS_MS, counts, q)
            latency[f"p{int(q * 100)}"] = value if value is not None and math.isfinite(value) else None
    return {
        "bundle_id": rollup.bundle_id, "profile": rollup.profile, "hour": utc(rollup.hour).isoformat(),
        "windows": rollup.windows, "inferences": rollup.inferences, "errors": rollup.errors,
        "error_rate": rollup.errors / rollup.inferences if rollup.inferences else None,
        "latency_ms": latency,
        "drift": {name: {"mean": entry["sum"] / entry["n"] if entry["n"] else None, "max": entry["max"]}
                  for name, entry in (rollup.drift or {}).items()},
    }


class RetentionJob:
    """Runs prune_telemetry every `interval_s` in a thread (the fleet server's maintenance pass)."""

    def __init__(self, session_factory: Any, *, raw_days: float, rollup_days: float, interval_s: float,
                 leadership: Any = None) -> None:
        self.session_factory = session_factory
        self.leadership = leadership  # with replicas, only the controller's replica prunes
        self.raw_days, self.rollup_days, self.interval_s = raw_days, rollup_days, interval_s
        self.last: PruneResult | None = None

    def run_once(self) -> PruneResult:
        with self.session_factory() as session:
            self.last = prune_telemetry(session, raw_days=self.raw_days, rollup_days=self.rollup_days)
        if self.last.windows_deleted or self.last.rollups_deleted:
            log.info("retention: %d telemetry windows rolled up and deleted, %d rollups deleted",
                     self.last.windows_deleted, self.last.rollups_deleted)
        return self.last

    def start_thread(self, stop: threading.Event) -> threading.Thread:
        def loop() -> None:
            while not stop.is_set():
                try:
                    if self.leadership is None or self.leadership.leading:
                        self.run_once()
                except Exception:  # a busy or restarting database: the next pass tries again
                    log.exception("retention pass failed; retrying in %.0f s", self.interval_s)
                stop.wait(self.interval_s)

        thread = threading.Thread(target=loop, name="retention", daemon=True)
        thread.start()
        return thread


def bundle_rollups(session: Session, bundle_id: str, *, limit: int = 168) -> list[dict[str, Any]]:
    """A bundle's rollups, newest hour first (then by profile), as `rollup_summary` dicts."""
    rows = session.scalars(select(TelemetryRollup).where(TelemetryRollup.bundle_id == bundle_id)
                           .order_by(TelemetryRollup.hour.desc(), TelemetryRollup.profile).limit(limit))
    return [rollup_summary(row) for row in rows]


__all__ = ["PruneResult", "RetentionJob", "bundle_rollups", "prune_telemetry", "rollup_summary"]
