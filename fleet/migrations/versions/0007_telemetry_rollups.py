"""Retention: `telemetry_rollups`, hourly aggregates per bundle and hardware profile of the telemetry
windows that aged out (fleet.services.retention), so the database stays bounded while long-term numbers
remain; and the index the gates read telemetry through, (device_id, received_at). Written out by hand, like 0001; `tests/fleet/test_migrations.py` checks the result matches
`fleet.models`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "telemetry_rollups",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("bundle_id", sa.String(length=64), nullable=True),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("windows", sa.Integer(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("latency_counts", sa.JSON(), nullable=True),
        sa.Column("drift", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_telemetry_rollups"),
        sa.UniqueConstraint("bundle_id", "profile", "hour", name="uq_telemetry_rollup"),
    )
    op.create_index("ix_telemetry_rollups_bundle_id", "telemetry_rollups", ["bundle_id"])
    op.create_index("ix_telemetry_rollups_hour", "telemetry_rollups", ["hour"])
    op.create_index("ix_telemetry_device_received", "telemetry", ["device_id", "received_at"])


def downgrade() -> None:
    op.drop_index("ix_telemetry_device_received", table_name="telemetry")
    op.drop_index("ix_telemetry_rollups_hour", table_name="telemetry_rollups")
    op.drop_index("ix_telemetry_rollups_bundle_id", table_name="telemetry_rollups")
    op.drop_table("telemetry_rollups")
