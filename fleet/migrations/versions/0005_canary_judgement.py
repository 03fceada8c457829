"""Canary judgement: `rollouts.max_bake_s` (how long a wave may stay inconclusive before the rollout
pauses) and `rollouts.holdback_percent` (the share of each profile kept on the old bundle through the
last wave, as its control).

Existing rollouts get no maximum (the default applies) and a 10 % hold-back, which matters only to
rollouts created from now on: members are chosen when a rollout is created. Written out by hand, like
0001; `tests/fleet/test_migrations.py` checks the result matches `fleet.models`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("rollouts", sa.Column("max_bake_s", sa.Float(), nullable=True))
    op.add_column("rollouts", sa.Column("holdback_percent", sa.Float(), nullable=False, server_default="10"))


def downgrade() -> None:
    # batch mode: SQLite drops a column by copying the table
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("holdback_percent")
        batch.drop_column("max_bake_s")
