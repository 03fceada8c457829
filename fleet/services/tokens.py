"""API tokens: create (plain text returned once, sha256 stored), list, revoke; every change audited."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgepack.errors import ConfigError, Conflict, NotFound
from fleet.auth import API_TOKEN_PREFIX, ROLES, hash_secret, new_secret
from fleet.models import ApiToken
from fleet.services import audit


def create_api_token(session: Session, actor: str, *, name: str, role: str) -> tuple[str, ApiToken]:
    """A new bearer token with `role` (viewer, operator or admin); returns (plain token, row)."""
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: use one of {', '.join(ROLES)}", role=role)
    name = (name or "").strip()
    if not name or len(name) > 128:
        raise ConfigError("a token needs a name of 1 to 128 characters")
    plain = new_secret(API_TOKEN_PREFIX)
    row = ApiToken(name=name, role=role, token_hash=hash_secret(plain))
    session.add(row)
    session.flush()
    audit.record(session, actor, "token.create", str(row.id), {"name": name, "role": role})
    session.commit()
    return plain, row


def list_api_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_api_token(session: Session, actor: str, token_id: int) -> ApiToken:
    """Revoke a token; refuses to revoke the last admin token (that would lock everyone out)."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no API token {token_id}")
    if row.revoked:
        return row
    if row.role == "admin":
        admins = session.scalars(select(ApiToken.id).where(ApiToken.role == "admin", ApiToken.revoked.is_(False))).all()
        if len(admins) <= 1:
            raise Conflict("refusing to revoke the last admin token")
    row.revoked = True
    audit.record(session, actor, "token.revoke", str(row.id), {"name": row.name, "role": row.role})
    session.commit()
    return row


__all__ = ["create_api_token", "list_api_tokens", "revoke_api_token"]
