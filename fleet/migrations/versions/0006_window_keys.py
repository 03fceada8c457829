"""Idempotent telemetry: `telemetry.window_key` (the device's window id, else the sha256 of the message)
with a unique constraint on (device_id, window_key), so a QoS 1 redelivery of a window stores one row.

Windows stored before this revision get `legacy:<id>`, unique by construction. Written out by hand, like
0001; `tests/fleet/test_migrations.py` checks the result matches `fleet.models`.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("telemetry", sa.Column("window_key", sa.String(length=72), nullable=True))
    op.execute("UPDATE telemetry SET window_key = 'legacy:' || CAST(id AS VARCHAR(20))")
    # batch mode: SQLite changes nullability and adds a constraint by copying the table
    with op.batch_alter_table("telemetry") as batch:
        batch.alter_column("window_key", existing_type=sa.String(length=72), nullable=False)
        batch.create_unique_constraint("uq_telemetry_device_window", ["device_id", "window_key"])


def downgrade() -> None:
    with op.batch_alter_table("telemetry") as batch:
        batch.drop_constraint("uq_telemetry_device_window", type_="unique")
        batch.drop_column("window_key")
