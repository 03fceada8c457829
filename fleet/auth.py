"""Who is calling: bearer API tokens with roles, and per-device credentials.

    viewer < operator < admin      roles of API tokens (`ApiToken.role`); a higher role may do what a lower may
    scopes                         optional on a token (`ApiToken.scopes`): the route groups it may call, each
                                   within its role (`SCOPES` names the role each needs); none means all its role may
    expiry                         optional (`ApiToken.expires_at`): past it the token is refused with a 401
    device credential              issued at enrollment; may download bundles and report for its own id, nothing else

Only sha256 hashes of secrets are stored. A secret is looked up by its hash (an index lookup on a value
an attacker cannot steer byte by byte) and the hashes are then compared in constant time.

FastAPI dependencies, as `Annotated` aliases for route signatures:

    SessionDep     a database session for the request
    PrincipalDep   any valid credential
    ViewerDep, OperatorDep, AdminDep    an API token with at least that role
    BundlesRead, RolloutsWrite, …       an API token with that scope's role, and the scope when it is scoped
    DeviceDep      a device credential (its `device_id` is the device's identity)
    ViewerOrDeviceDep                   either (bundle downloads)
"""

from __future__ import annotations

import hashlib
import hmac
import datetime as dt
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgepack.errors import ConfigError, NotAuthenticated, PermissionDenied
from edgepack.files import atomic_write
from fleet.models import ApiToken, Device, utcnow
from fleet.settings import FleetSettings

log = logging.getLogger(__name__)

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[str, ...] = ("viewer", "operator", "admin")
API_TOKEN_PREFIX = "ept_"
DEVICE_CREDENTIAL_PREFIX = "epd_"
ENROLLMENT_TOKEN_PREFIX = "epe_"
BOOTSTRAP_TOKEN_NAME = "admin (bootstrap)"
ENV_TOKEN_NAME = "admin (EDGEPACK_ADMIN_TOKEN)"

# The route groups a token may be scoped to, and the least role each needs (a scope narrows what a
# token's role allows; it never widens it). `read` is every GET of the group, `write` every change.
SCOPES: dict[str, str] = {
    "bundles:read": "viewer",
    "bundles:write": "operator",
    "devices:read": "viewer",
    "devices:write": "operator",
    "rollouts:read": "viewer",
    "rollouts:write": "operator",
    "alerts:read": "viewer",
    "tokens:read": "admin",
    "tokens:write": "admin",
    "audit:read": "admin",
}
Scope = Literal["bundles:read", "bundles:write", "devices:read", "devices:write", "rollouts:read",
                "rollouts:write", "alerts:read", "tokens:read", "tokens:write", "audit:read"]


def role_rank(role: str) -> int:
    try:
        return ROLES.index(role)
    except ValueError:
        raise ConfigError(f"unknown role {role!r}: use one of {', '.join(ROLES)}", role=role) from None


def new_secret(prefix: str) -> str:
    """A fresh secret; the prefix only tells a human which kind it is."""
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def same_hash(stored: str, presented: str) -> bool:
    return hmac.compare_digest(stored.encode("ascii"), presented.encode("ascii"))


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands timestamps back naive; everything this server stores is UTC.
    return value.replace(tzinfo=dt.timezone.utc) if value is not None and value.tzinfo is None else value


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: an API token (name, role, its scopes or None for all, its row id) or a
    device (device_id)."""

    name: str
    role: str | None = None
    device_id: str | None = None
    scopes: frozenset[str] | None = None
    token_id: int | None = None

    @property
    def is_device(self) -> bool:
        return self.device_id is not None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"device:{self.device_id}" if self.is_device else f"token:{self.name}"

    def require_role(self, role: str) -> Principal:
        if self.is_device:
            raise PermissionDenied(
                "a device credential may only download bundles and report its own status", device_id=self.device_id
            )
        if role_rank(self.role or "") < role_rank(role):
            raise PermissionDenied(f"this needs the {role} role; token {self.name!r} has {self.role}", role=self.role)
        return self

    def require_scope(self, scope: str) -> Principal:
        """The scope's role, and the scope itself when the token is scoped."""
        self.require_role(SCOPES[scope])
        if self.scopes is not None and scope not in self.scopes:
            held = ", ".join(sorted(self.scopes)) or "none"
            raise PermissionDenied(f"this needs the {scope} scope; token {self.name!r} has {held}", scope=scope)
        return self

    def require_device(self, device_id: str | None = None) -> Principal:
        if not self.is_device:
            raise PermissionDenied("this needs a device credential")
        if device_id is not None and not hmac.compare_digest(self.device_id.encode(), device_id.encode()):
            raise PermissionDenied(
                f"device {self.device_id} may not act for device {device_id}", device_id=self.device_id
            )
        return self


def authenticate(session: Session, secret: str) -> Principal:
    """The principal a bearer secret belongs to; NotAuthenticated when it is unknown, revoked or expired."""
    presented = hash_secret(secret)
    token = session.scalars(select(ApiToken).where(ApiToken.token_hash == presented)).first()
    if token is not None and same_hash(token.token_hash, presented):
        if token.revoked:
            raise NotAuthenticated("this API token has been revoked")
        expires_at = as_utc(token.expires_at)
        if expires_at is not None and expires_at <= utcnow():
            raise NotAuthenticated(f"this API token expired at {expires_at.isoformat()}; ask an admin for a new one")
        scopes = frozenset(token.scopes) if token.scopes is not None else None
        return Principal(name=token.name, role=token.role, scopes=scopes, token_id=token.id)
    device = session.scalars(select(Device).where(Device.credential_hash == presented)).first()
    if device is not None and same_hash(device.credential_hash, presented):
        return Principal(name=device.id, device_id=device.id)
    raise NotAuthenticated("unknown bearer token")


def bootstrap_admin_token(session: Session, settings: FleetSettings) -> str | None:
    """Make sure the server has an admin token; return its plain text only when one was just created.

    With EDGEPACK_ADMIN_TOKEN (`settings.admin_token`) that token is registered (and a previous
    environment token revoked, so rotating the variable retires the old one); nothing is written to disk.
    Otherwise the token in `data_dir/admin.token` is kept while the database knows it; if not, a new one
    is generated, its hash stored, and the plain token written to that file with mode 0600. The caller
    (the CLI) prints a returned token once. Commits.
    """
    if settings.admin_token is not None:
        wanted = hash_secret(settings.admin_token.get_secret_value())
        for row in session.scalars(select(ApiToken).where(ApiToken.name == ENV_TOKEN_NAME, ApiToken.revoked.is_(False))):
            if not same_hash(row.token_hash, wanted):
                row.revoked = True
        existing = session.scalars(select(ApiToken).where(ApiToken.token_hash == wanted)).first()
        if existing is None:
            session.add(ApiToken(name=ENV_TOKEN_NAME, role="admin", token_hash=wanted))
        elif existing.revoked or existing.role != "admin":
            existing.revoked, existing.role = False, "admin"
        session.commit()
        return None

    token_file = settings.admin_token_file
    if token_file.is_file():
        stored = token_file.read_text(encoding="utf-8").strip()
        row = session.scalars(select(ApiToken).where(ApiToken.token_hash == hash_secret(stored))).first()
        if row is not None and not row.revoked and row.role == "admin":
            return None
    plain = new_secret(API_TOKEN_PREFIX)
    session.add(ApiToken(name=BOOTSTRAP_TOKEN_NAME, role="admin", token_hash=hash_secret(plain)))
    session.flush()
    atomic_write(token_file, plain + "\n", mode=0o600)
    session.commit()
    log.info("created an admin token; it is in %s", token_file)
    return plain


# ---------------------------------------------------------------------------------------------------
# FastAPI dependencies


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def _bearer_secret(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise NotAuthenticated("missing bearer token (send 'Authorization: Bearer TOKEN')")
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise NotAuthenticated("malformed Authorization header (expected 'Bearer TOKEN')")
    return secret


def current_principal(request: Request) -> Principal:
    # Its own session, closed before the endpoint runs. With the request's session the connection would
    # stay checked out while the request waits for a worker thread to run its endpoint; a burst of more
    # requests than there are threads then deadlocks the server: every thread waits in authentication for
    # a connection, and every connection belongs to a request waiting for a thread.
    secret = _bearer_secret(request)
    with request.app.state.session_factory() as session:
        return authenticate(session, secret)


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def requires(role: Role) -> Callable[[Principal], Principal]:
    def dependency(principal: PrincipalDep) -> Principal:
        return principal.require_role(role)

    dependency.__name__ = f"requires_{role}"
    return dependency


def requires_scope(scope: Scope) -> Callable[[Principal], Principal]:
    def dependency(principal: PrincipalDep) -> Principal:
        return principal.require_scope(scope)

    dependency.__name__ = f"requires_{scope.replace(':', '_')}"
    return dependency


def _device_principal(principal: PrincipalDep) -> Principal:
    return principal.require_device()


def _viewer_or_device(principal: PrincipalDep) -> Principal:
    return principal if principal.is_device else principal.require_scope("bundles:read")


ViewerDep = Annotated[Principal, Depends(requires("viewer"))]
OperatorDep = Annotated[Principal, Depends(requires("operator"))]
AdminDep = Annotated[Principal, Depends(requires("admin"))]
DeviceDep = Annotated[Principal, Depends(_device_principal)]
ViewerOrDeviceDep = Annotated[Principal, Depends(_viewer_or_device)]
BundlesRead = Annotated[Principal, Depends(requires_scope("bundles:read"))]
BundlesWrite = Annotated[Principal, Depends(requires_scope("bundles:write"))]
DevicesRead = Annotated[Principal, Depends(requires_scope("devices:read"))]
DevicesWrite = Annotated[Principal, Depends(requires_scope("devices:write"))]
RolloutsRead = Annotated[Principal, Depends(requires_scope("rollouts:read"))]
RolloutsWrite = Annotated[Principal, Depends(requires_scope("rollouts:write"))]
AlertsRead = Annotated[Principal, Depends(requires_scope("alerts:read"))]
TokensRead = Annotated[Principal, Depends(requires_scope("tokens:read"))]
TokensWrite = Annotated[Principal, Depends(requires_scope("tokens:write"))]
AuditRead = Annotated[Principal, Depends(requires_scope("audit:read"))]

__all__ = [
    "API_TOKEN_PREFIX",
    "AdminDep",
    "AlertsRead",
    "AuditRead",
    "BundlesRead",
    "BundlesWrite",
    "DevicesRead",
    "DevicesWrite",
    "RolloutsRead",
    "RolloutsWrite",
    "TokensRead",
    "TokensWrite",
    "DEVICE_CREDENTIAL_PREFIX",
    "DeviceDep",
    "ENROLLMENT_TOKEN_PREFIX",
    "OperatorDep",
    "Principal",
    "PrincipalDep",
    "ROLES",
    "Role",
    "SCOPES",
    "Scope",
    "SessionDep",
    "ViewerDep",
    "ViewerOrDeviceDep",
    "as_utc",
    "authenticate",
    "bootstrap_admin_token",
    "hash_secret",
    "new_secret",
    "role_rank",
]
