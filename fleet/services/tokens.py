"""API tokens: create (plain text returned once, sha256 stored), list, revoke; every change audited.

A token may be scoped (`fleet.auth.SCOPES`: the route groups it may call, each within its role) and may
expire (`ttl_s`); an unscoped token without a ttl can do all its role allows until it is revoked.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from edgepack.errors import ConfigError, Conflict, NotFound
from fleet.auth import API_TOKEN_PREFIX, ROLES, SCOPES, hash_secret, new_secret, role_rank
from fleet.models import ApiToken, utcnow
from fleet.services import audit

MAX_TTL_S = 10 * 365 * 24 * 3600.0  # ten years; a longer-lived token is better left without an expiry


def validate_scopes(role: str, scopes: Iterable[str] | None) -> list[str] | None:
    """Known scopes the role can use, sorted and deduplicated; None stays None (every scope of the role).

    A scope above the token's role is refused rather than stored: it would never let the token do anything."""
    if scopes is None:
        return None
    wanted = sorted(set(scopes))
    for scope in wanted:
        if scope not in SCOPES:
            raise ConfigError(f"unknown scope {scope!r}: use any of {', '.join(SCOPES)}", scope=scope)
        if role_rank(SCOPES[scope]) > role_rank(role):
            raise ConfigError(f"scope {scope} needs the {SCOPES[scope]} role; this token would be {role}",
                              scope=scope)
    return wanted


def create_api_token(session: Session, actor: str, *, name: str, role: str, scopes: Iterable[str] | None = None,
                     ttl_s: float | None = None) -> tuple[str, ApiToken]:
    """A new bearer token with `role` (viewer, operator or admin), optionally limited to `scopes` and
    expiring `ttl_s` seconds from now; returns (plain token, row)."""
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: use one of {', '.join(ROLES)}", role=role)
    name = (name or "").strip()
    if not name or len(name) > 128:
        raise ConfigError("a token needs a name of 1 to 128 characters")
    granted = validate_scopes(role, scopes)
    if ttl_s is not None and not 0 < ttl_s <= MAX_TTL_S:
        raise ConfigError(f"ttl_s must be between 0 and {MAX_TTL_S:g} seconds (or null for no expiry), got {ttl_s!r}")
    expires_at = utcnow() + dt.timedelta(seconds=ttl_s) if ttl_s is not None else None
    plain = new_secret(API_TOKEN_PREFIX)
    row = ApiToken(name=name, role=role, token_hash=hash_secret(plain), scopes=granted, expires_at=expires_at)
    session.add(row)
    session.flush()
    audit.record(session, actor, "token.create", str(row.id), {
        "name": name, "role": role, "scopes": granted, "expires_at": expires_at.isoformat() if expires_at else None})
    session.commit()
    return plain, row


def list_api_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_api_token(session: Session, actor: str, token_id: int, *, caller_token_id: int | None = None) -> ApiToken:
    """Revoke a token. Refuses to revoke the token making the request, and the last admin token that
    still works (both would lock the caller, or everyone, out)."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no API token {token_id}")
    if row.revoked:
        return row
    if caller_token_id is not None and row.id == caller_token_id:
        raise Conflict("a token cannot revoke itself; revoke it with another admin token")
    if row.role == "admin":
        working = session.scalars(select(ApiToken.id).where(
            ApiToken.role == "admin", ApiToken.revoked.is_(False),
            or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > utcnow()))).all()
        if working == [row.id]:
            raise Conflict("refusing to revoke the last admin token")
    row.revoked = True
    audit.record(session, actor, "token.revoke", str(row.id), {"name": row.name, "role": row.role})
    session.commit()
    return row


__all__ = ["MAX_TTL_S", "create_api_token", "list_api_tokens", "revoke_api_token", "validate_scopes"]
