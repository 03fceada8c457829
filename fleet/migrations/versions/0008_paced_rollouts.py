"""Paced and dynamic rollouts: `rollouts.pacing` (max_per_minute, max_concurrent, maintenance windows and the
late-joiner policy, fleet.services.pacing). Existing rollouts get none: unpaced, as they ran. Written out by
hand, like 0001; `tests/fleet/test_migrations.py` checks the result matches `fleet.models`.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("rollouts", sa.Column("pacing", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("pacing")
