"""Telemetry on PostgreSQL is a table partitioned by day (`received_at`), so retention drops whole days
instead of deleting rows one by one (no long delete, no table bloat, no vacuum debt).

The layout, created by migration 0009 and kept up by the retention pass (fleet.services.retention):

- `telemetry`: the parent, `PARTITION BY RANGE (received_at)`; its primary key is (id, received_at), as
  PostgreSQL requires the partition key in every unique index of a partitioned table.
- `telemetry_partitions.telemetry_YYYYMMDD`: one partition per UTC day, created `DAYS_AHEAD` days ahead, in
  their own schema so the fleet's own schema holds exactly the tables of fleet.models.
- `telemetry_partitions.telemetry_default`: the DEFAULT partition, for a row no day partition covers (a
  server that ran no retention pass for days, a window imported with an old time). Retention deletes its old
  rows in chunks; a day partition is not created over rows the default already holds for that day.

Idempotency without a unique index: a window is stored once per (device_id, window_key). SQLite keeps that as
a unique constraint; on a partitioned table a unique index would have to include `received_at`, which a
redelivery does not repeat. So the writer looks the keys up (index `ix_telemetry_device_window`, every
partition) while it holds its batch's device rows FOR UPDATE (fleet.services.status.store_batch): a replica
storing the same device's window waits for that transaction and then finds the row.

SQLite has no partitions: there retention deletes old windows in chunks, as it always did.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

SCHEMA = "telemetry_partitions"
PARENT = "telemetry"
DEFAULT = "telemetry_default"
DAYS_AHEAD = 3
_NAME = re.compile(r"^telemetry_(\d{8})$")

# The schema objects that differ by dialect on purpose (fleet.models declares the SQLite form); used by the
# migrations test and `alembic check` to compare the rest exactly.
SQLITE_ONLY = {"uq_telemetry_device_window"}
POSTGRESQL_ONLY = {"ix_telemetry_device_window"}


def include_object(dialect_name: str):
    """An alembic `include_object` hook for `dialect_name`: leaves out of the comparison the objects that
    exist on the other dialect only (the rest of the schema is compared exactly)."""

    def include(obj, name, type_, reflected, compare_to) -> bool:
        if dialect_name == "postgresql" and name in SQLITE_ONLY | POSTGRESQL_ONLY:
            return False
        return True

    return include


def qualified(name: str) -> str:
    """A partition's name as SQL: quoted, in SCHEMA."""
    return f'"{SCHEMA}"."{name}"'


@dataclass(frozen=True)
class Partition:
    name: str
    day: dt.date

    @property
    def start(self) -> dt.datetime:
        return dt.datetime.combine(self.day, dt.time(), tzinfo=dt.timezone.utc)

    @property
    def end(self) -> dt.datetime:
        return self.start + dt.timedelta(days=1)

    @property
    def qualified(self) -> str:
        return qualified(self.name)


def partition_for(day: dt.date) -> Partition:
    return Partition(name=f"telemetry_{day:%Y%m%d}", day=day)


def is_partitioned(connection: Connection) -> bool:
    """Whether `telemetry` is a partitioned table here (PostgreSQL after migration 0009)."""
    if connection.dialect.name != "postgresql":
        return False
    return bool(connection.execute(text(
        "SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
        "WHERE c.relname = :name AND c.relnamespace = to_regnamespace(current_schema())::oid"), {"name": PARENT}).first())


def day_partitions(connection: Connection) -> list[Partition]:
    """The day partitions of `telemetry`, oldest first (the default partition is not among them)."""
    rows = connection.execute(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent "
        "WHERE p.relname = :parent AND p.relnamespace = to_regnamespace(current_schema())::oid"),
        {"parent": PARENT}).scalars()
    found = []
    for name in rows:
        match = _NAME.match(name)
        if match:
            found.append(Partition(name=name, day=dt.datetime.strptime(match.group(1), "%Y%m%d").date()))
    return sorted(found, key=lambda p: p.day)


def ensure_partitions(connection: Connection, first: dt.date, last: dt.date) -> list[Partition]:
    """Create the day partitions from `first` to `last` (inclusive) that do not exist; returns those created.
    A day whose rows the default partition already holds is left there (PostgreSQL refuses the partition)."""
    existing = {p.day for p in day_partitions(connection)}
    created = []
    day = first
    while day <= last:
        if day not in existing:
            partition = partition_for(day)
            held = connection.execute(text(
                f"SELECT 1 FROM {qualified(DEFAULT)} WHERE received_at >= :start AND received_at < :end LIMIT 1"),
                {"start": partition.start, "end": partition.end}).first()
            if not held:
                connection.execute(text(
                    f"CREATE TABLE {partition.qualified} PARTITION OF {PARENT} "
                    f"FOR VALUES FROM ('{partition.start.isoformat()}') TO ('{partition.end.isoformat()}')"))
                created.append(partition)
        day += dt.timedelta(days=1)
    return created


def ensure_ahead(connection: Connection, today: dt.date | None = None) -> list[Partition]:
    """Today's partition and `DAYS_AHEAD` more (the retention pass calls this every time it runs)."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    return ensure_partitions(connection, today, today + dt.timedelta(days=DAYS_AHEAD))


def in_partition(name: str):
    """A WHERE clause for the rows of `telemetry` that live in partition `name` (of SCHEMA)."""
    if not (name == DEFAULT or _NAME.match(name)):
        raise ValueError(f"not a telemetry partition: {name!r}")
    return text(f"telemetry.tableoid = '{qualified(name)}'::regclass")


def drop_partition(connection: Connection, partition: Partition) -> None:
    connection.execute(text(f"DROP TABLE {partition.qualified}"))


__all__ = ["DAYS_AHEAD", "DEFAULT", "Partition", "SCHEMA", "day_partitions", "drop_partition", "ensure_ahead",
           "ensure_partitions", "in_partition", "include_object", "is_partitioned", "partition_for", "qualified"]
