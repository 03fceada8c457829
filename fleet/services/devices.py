"""Devices: enrollment tokens, enrollment (token → per-device credential), lookup and label selectors.

An enrollment token is created with labels, a number of uses and a lifetime; its plain text is returned
once and only its hash is stored. `enroll` spends one use with a single conditional UPDATE, so two
devices racing for the last use cannot both win, on SQLite or PostgreSQL. The device's labels are the
token's labels overlaid by the labels the device asks for. Enrolling an id that exists needs a token too
and rotates the device's credential (the old one stops working).

Label selectors are `k=v,k2=v2` (every pair must match); `parse_selector` and `matches` come from
`edgepack.selectors`, so the CLI, this API and the rollout engine read a selector the same way.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from edgepack.errors import ConfigError, Conflict, NotAuthenticated, NotFound, PermissionDenied
from edgepack.protocol import validate_device_id
from edgepack.selectors import format_selector, matches, parse_selector, validate_labels
from fleet import metrics
from fleet.auth import DEVICE_CREDENTIAL_PREFIX, ENROLLMENT_TOKEN_PREFIX, hash_secret, new_secret
from fleet.models import Device, EnrollmentToken, utcnow
from fleet.services import audit

DEFAULT_TOKEN_TTL_S = 24 * 3600.0
MAX_TOKEN_USES = 1_000_000
_PROFILE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def validate_profile(profile: str) -> str:
    if not isinstance(profile, str) or not _PROFILE.match(profile):
        raise ConfigError(f"invalid hardware profile name {profile!r}", profile=profile)
    return profile


def _as_utc(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands timestamps back naive; everything this server stores is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


# ---------------------------------------------------------------------------------------------------
# enrollment


def create_enrollment_token(session: Session, actor: str, *, labels: Mapping[str, Any] | None = None,
                            uses: int = 1, ttl_s: float | None = DEFAULT_TOKEN_TTL_S) -> tuple[str, EnrollmentToken]:
    """A new enrollment token; returns (plain token — shown once, never stored —, its row)."""
    labels = validate_labels(labels)
    if not isinstance(uses, int) or isinstance(uses, bool) or not 1 <= uses <= MAX_TOKEN_USES:
        raise ConfigError(f"uses must be between 1 and {MAX_TOKEN_USES}, got {uses!r}")
    if ttl_s is not None and not ttl_s > 0:
        raise ConfigError(f"ttl_s must be positive (or null for no expiry), got {ttl_s!r}")
    plain = new_secret(ENROLLMENT_TOKEN_PREFIX)
    expires_at = utcnow() + dt.timedelta(seconds=ttl_s) if ttl_s is not None else None
    row = EnrollmentToken(token_hash=hash_secret(plain), labels=labels, uses_left=uses, expires_at=expires_at,
                          created_by=actor)
    session.add(row)
    session.flush()
    audit.record(session, actor, "enrollment_token.create", str(row.id),
                 {"labels": labels, "uses": uses, "expires_at": expires_at.isoformat() if expires_at else None})
    session.commit()
    return plain, row


def _spend_token(session: Session, token: str) -> EnrollmentToken:
    """Take one use of the token in the current transaction, or raise saying why not."""
    token_hash = hash_secret(token)
    now = utcnow()
    spent = session.execute(
        update(EnrollmentToken)
        .where(EnrollmentToken.token_hash == token_hash, EnrollmentToken.uses_left > 0,
               or_(EnrollmentToken.expires_at.is_(None), EnrollmentToken.expires_at > now))
        .values(uses_left=EnrollmentToken.uses_left - 1)
        .execution_options(synchronize_session=False)
    )
    row = session.scalars(select(EnrollmentToken).where(EnrollmentToken.token_hash == token_hash)).first()
    if spent.rowcount == 1 and row is not None:
        session.refresh(row)
        return row
    session.rollback()
    if row is None:
        raise NotAuthenticated("unknown enrollment token")
    if row.uses_left <= 0:
        raise PermissionDenied("this enrollment token has been used up")
    raise PermissionDenied(f"this enrollment token expired at {_as_utc(row.expires_at).isoformat()}")


def enroll(session: Session, *, token: str, device_id: str, profile: str,
           labels: Mapping[str, Any] | None = None) -> tuple[str, Device, bool]:
    """Enroll a device with a one-time token; returns (plain credential — shown once —, device, created).

    The id is checked with `edgepack.protocol.validate_device_id` (it goes into MQTT topics and URLs).
    An existing id is re-enrolled: new credential, profile and labels; its state is kept.
    """
    try:
        validate_device_id(device_id)
        validate_profile(profile)
        asked = validate_labels(labels)
        if not isinstance(token, str) or not token:
            raise NotAuthenticated("an enrollment token is required")
        token_row = _spend_token(session, token)
    except Exception:
        metrics.ENROLLMENTS.labels("refused").inc()
        raise
    merged = {**(token_row.labels or {}), **asked}
    credential = new_secret(DEVICE_CREDENTIAL_PREFIX)
    device = session.get(Device, device_id)
    created = device is None
    if device is None:
        device = Device(id=device_id, profile=profile, labels=merged, credential_hash=hash_secret(credential))
        session.add(device)
    else:
        device.profile, device.labels, device.credential_hash = profile, merged, hash_secret(credential)
    audit.record(session, f"enrollment-token:{token_row.id}", "device.enroll" if created else "device.reenroll",
                 device_id, {"profile": profile, "labels": merged, "token_id": token_row.id})
    try:
        session.commit()
    except sa_exc.IntegrityError:
        session.rollback()
        metrics.ENROLLMENTS.labels("refused").inc()
        raise Conflict(f"device {device_id} was enrolled by another request at the same time; try again",
                       device_id=device_id) from None
    metrics.ENROLLMENTS.labels("enrolled" if created else "reenrolled").inc()
    return credential, device, created


# ---------------------------------------------------------------------------------------------------
# lookup


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id) if isinstance(device_id, str) else None
    if device is None:
        raise NotFound(f"no device {device_id!r}", device_id=device_id)
    return device


def list_devices(session: Session, *, selector: str | Mapping[str, Any] | None = None,
                 profile: str | None = None, online: bool | None = None) -> list[Device]:
    """Devices sorted by id whose labels match every `k=v` of the selector (and the profile, if given).

    Labels are JSON, which SQLite and PostgreSQL query differently; matching here keeps one behaviour."""
    wanted = parse_selector(selector)
    query = select(Device).order_by(Device.id)
    if profile:
        query = query.where(Device.profile == profile)
    if online is not None:
        query = query.where(Device.online.is_(online))
    return [device for device in session.scalars(query) if matches(device.labels, wanted)]


__all__ = [
    "DEFAULT_TOKEN_TTL_S",
    "create_enrollment_token",
    "enroll",
    "format_selector",
    "get_device",
    "list_devices",
    "matches",
    "parse_selector",
    "validate_labels",
    "validate_profile",
]
