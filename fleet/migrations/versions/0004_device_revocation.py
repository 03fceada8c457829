"""Credential lifecycle: `devices.revoked_at`, and enrollment tokens bound to a profile and their labels
(`enrollment_tokens.profile`, `enrollment_tokens.bind_labels`).

All nullable or defaulted, so existing devices stay active and existing tokens stay unbound. Written out
by hand, like 0001; `tests/fleet/test_migrations.py` checks the result matches `fleet.models`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("enrollment_tokens", sa.Column("profile", sa.String(length=64), nullable=True))
    op.add_column("enrollment_tokens", sa.Column("bind_labels", sa.Boolean(), nullable=False,
                                                 server_default=sa.false()))


def downgrade() -> None:
    # batch mode: SQLite drops a column by copying the table
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.drop_column("bind_labels")
        batch.drop_column("profile")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("revoked_at")
