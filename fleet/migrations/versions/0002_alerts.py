"""Alerts: drift outside a rollout (and later kinds), with their webhook delivery state.

Written out by hand, like 0001; `tests/fleet/test_migrations.py` checks the result matches `fleet.models`
on SQLite and PostgreSQL.

Revision ID: 0002
Revises: 0001
Create Date: 2024-07-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", _TIME, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("bundle_id", sa.String(length=64), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("cleared_at", _TIME, nullable=True),
        sa.Column("delivered", sa.Boolean(), nullable=False),
        sa.Column("delivered_at", _TIME, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_attempt_at", _TIME, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], name="fk_alerts_device_id_devices"),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
    )
    op.create_index("ix_alerts_at", "alerts", ["at"], unique=False)
    op.create_index("ix_alerts_kind", "alerts", ["kind"], unique=False)
    op.create_index("ix_alerts_device_id", "alerts", ["device_id"], unique=False)
    op.create_index("ix_alerts_delivered", "alerts", ["delivered"], unique=False)


def downgrade() -> None:
    op.drop_table("alerts")
