"""The audit log: every admin action and every rollout decision, with who did it and the details.

`record` adds an entry to the caller's session without committing, so the entry lands in the same
transaction as the change it describes: both or neither.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.models import AuditEntry

MAX_PAGE = 1000


def record(session: Session, actor: str, action: str, target: str | None = None,
           details: dict[str, Any] | None = None) -> AuditEntry:
    """Add an audit entry (`action` like "bundle.promote", `target` the id acted on); not committed."""
    entry = AuditEntry(actor=actor, action=action, target=target, details=dict(details or {}))
    session.add(entry)
    return entry


def list_entries(session: Session, *, action: str | None = None, target: str | None = None,
                 actor: str | None = None, before_id: int | None = None, limit: int = 100) -> list[AuditEntry]:
    """Entries newest first; `before_id` pages back from an entry; `action` matches exactly or by prefix
    when it ends in '.' ("rollout." gives every rollout action)."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(max(1, min(limit, MAX_PAGE)))
    if action:
        query = query.where(AuditEntry.action.startswith(action) if action.endswith(".") else AuditEntry.action == action)
    if target:
        query = query.where(AuditEntry.target == target)
    if actor:
        query = query.where(AuditEntry.actor == actor)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    return list(session.scalars(query))


__all__ = ["list_entries", "record"]
