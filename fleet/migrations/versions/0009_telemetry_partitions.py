"""Telemetry's own index on device_id goes (the (device_id, received_at) and (device_id, window_key) indexes
both start with it: one fewer index to keep up per window). PostgreSQL: telemetry becomes a table partitioned by day on `received_at` (fleet/partitions.py), so
retention drops whole days. The rows there are moved over (a partition for every day they cover, then the
days ahead); the sequence of `id` carries on. SQLite is unchanged (it has no partitions).

Written out by hand, like 0001; `tests/fleet/test_migrations.py` checks the result matches `fleet.models`
(the unique constraint on (device_id, window_key) is SQLite's: see fleet.partitions for PostgreSQL's).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

from fleet import partitions

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("id, device_id, window_key, bundle_id, received_at, window_s, inferences, errors, p50_ms, p95_ms, p99_ms, "
            "drift, payload")
_INDEXES = ("DROP INDEX IF EXISTS ix_telemetry_device_id, ix_telemetry_bundle_id, ix_telemetry_received_at, "
            "ix_telemetry_device_received, ix_telemetry_device_window")


def _create_table(partitioned: bool) -> None:
    """`telemetry` with 0001's columns (and 0006's window_key); partitioned by day, or as before 0009."""
    if partitioned:  # PostgreSQL wants the partition key in the primary key; the window key is an index then
        keys = "CONSTRAINT pk_telemetry PRIMARY KEY (id, received_at)"
        tail = " PARTITION BY RANGE (received_at)"
    else:
        keys = ("CONSTRAINT pk_telemetry PRIMARY KEY (id),\n"
                "            CONSTRAINT uq_telemetry_device_window UNIQUE (device_id, window_key)")
        tail = ""
    op.execute(f"""
        CREATE TABLE telemetry (
            id INTEGER NOT NULL DEFAULT nextval('telemetry_id_seq'),
            device_id VARCHAR(128) NOT NULL,
            window_key VARCHAR(72) NOT NULL,
            bundle_id VARCHAR(64),
            received_at TIMESTAMP WITH TIME ZONE NOT NULL,
            window_s FLOAT NOT NULL,
            inferences INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            p50_ms FLOAT,
            p95_ms FLOAT,
            p99_ms FLOAT,
            drift JSON NOT NULL,
            payload JSON NOT NULL,
            CONSTRAINT fk_telemetry_device_id_devices FOREIGN KEY (device_id) REFERENCES devices (id),
            {keys}
        ){tail}""")


def _create_indexes(unique_key: bool) -> None:
    if unique_key:  # the downgrade's table, as 0001 made it
        op.execute("CREATE INDEX ix_telemetry_device_id ON telemetry (device_id)")
    op.execute("CREATE INDEX ix_telemetry_bundle_id ON telemetry (bundle_id)")
    op.execute("CREATE INDEX ix_telemetry_received_at ON telemetry (received_at)")
    op.execute("CREATE INDEX ix_telemetry_device_received ON telemetry (device_id, received_at)")
    if not unique_key:
        op.execute("CREATE INDEX ix_telemetry_device_window ON telemetry (device_id, window_key)")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.drop_index("ix_telemetry_device_id", table_name="telemetry")
        return
    bind = op.get_bind()
    op.execute("ALTER TABLE telemetry RENAME TO telemetry_unpartitioned")
    op.execute("ALTER TABLE telemetry_unpartitioned DROP CONSTRAINT uq_telemetry_device_window")
    op.execute("ALTER TABLE telemetry_unpartitioned DROP CONSTRAINT fk_telemetry_device_id_devices")
    op.execute("ALTER TABLE telemetry_unpartitioned DROP CONSTRAINT pk_telemetry")
    op.execute(_INDEXES)
    op.execute(f'CREATE SCHEMA IF NOT EXISTS "{partitions.SCHEMA}"')
    _create_table(partitioned=True)
    op.execute(f"CREATE TABLE {partitions.qualified(partitions.DEFAULT)} PARTITION OF telemetry DEFAULT")
    _create_indexes(unique_key=False)
    today = dt.datetime.now(dt.timezone.utc).date()
    span = bind.execute(text("SELECT min(received_at), max(received_at) FROM telemetry_unpartitioned")).one()
    first = min(span[0].astimezone(dt.timezone.utc).date(), today) if span[0] is not None else today
    partitions.ensure_partitions(bind, first, today + dt.timedelta(days=partitions.DAYS_AHEAD))
    op.execute(f"INSERT INTO telemetry ({_COLUMNS}) SELECT {_COLUMNS} FROM telemetry_unpartitioned")
    op.execute("ALTER SEQUENCE telemetry_id_seq OWNED BY telemetry.id")
    op.execute("DROP TABLE telemetry_unpartitioned")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.create_index("ix_telemetry_device_id", "telemetry", ["device_id"])
        return
    op.execute("ALTER TABLE telemetry RENAME TO telemetry_partitioned")
    op.execute("ALTER TABLE telemetry_partitioned DROP CONSTRAINT fk_telemetry_device_id_devices")
    op.execute("ALTER TABLE telemetry_partitioned DROP CONSTRAINT pk_telemetry")
    op.execute(_INDEXES)
    _create_table(partitioned=False)
    _create_indexes(unique_key=True)
    # a window stored twice is not possible here (the lookup under the device lock), but a unique constraint
    # must not fail the downgrade over one: keep the first
    op.execute(f"INSERT INTO telemetry ({_COLUMNS}) SELECT DISTINCT ON (device_id, window_key) {_COLUMNS} "
               "FROM telemetry_partitioned ORDER BY device_id, window_key, id")
    op.execute("ALTER SEQUENCE telemetry_id_seq OWNED BY telemetry.id")
    op.execute("DROP TABLE telemetry_partitioned")
    op.execute(f'DROP SCHEMA IF EXISTS "{partitions.SCHEMA}" CASCADE')
