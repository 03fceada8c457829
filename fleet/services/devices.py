"""Devices: enrollment tokens, enrollment (token → per-device credential), lookup and label selectors.

An enrollment token is created with labels, a number of uses and a lifetime; its plain text is returned
once and only its hash is stored. `enroll` spends one use with a single conditional UPDATE, so two
devices racing for the last use cannot both win, on SQLite or PostgreSQL. The device's labels are the
token's labels overlaid by the labels the device asks for. Enrolling an id that exists needs a token too
and rotates the device's credential (the old one stops working).

A token can be bound: to a `profile` (a device enrolling with another one is refused) and, with
`bind_labels`, to its labels (a device may add labels but not change one the token set).

A device's credential is also its MQTT password (username = its id): every change to it goes to the
broker through a `fleet.broker.DeviceIdentities` first (Mosquitto's dynsec, the embedded broker), and only
then to the database, so a broker that does not take it leaves the device as it was (BrokerUnavailable).
`revoke_device` stops the HTTP credential at once (its hash is replaced by one nobody holds), deletes the
MQTT identity, which closes the device's open session; re-enrolling a revoked id needs a token created
after the revocation. `rotate_credential` returns a new secret for both planes.

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

from edgepack.errors import BrokerUnavailable, ConfigError, Conflict, NotAuthenticated, NotFound, PermissionDenied
from edgepack.protocol import validate_device_id
from edgepack.selectors import format_selector, matches, parse_selector, validate_labels
from fleet import metrics
from fleet.auth import DEVICE_CREDENTIAL_PREFIX, ENROLLMENT_TOKEN_PREFIX, as_utc, hash_secret, new_secret
from fleet.models import Device, EnrollmentToken, utcnow
from fleet.broker import DeviceIdentities, NoBrokerIdentities
from fleet.broker.rights import FLEET_USERNAME
from fleet.services import audit

DEFAULT_TOKEN_TTL_S = 24 * 3600.0
MAX_TOKEN_USES = 1_000_000
_PROFILE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def validate_profile(profile: str) -> str:
    if not isinstance(profile, str) or not _PROFILE.match(profile):
        raise ConfigError(f"invalid hardware profile name {profile!r}", profile=profile)
    return profile


# ---------------------------------------------------------------------------------------------------
# enrollment


def create_enrollment_token(session: Session, actor: str, *, labels: Mapping[str, Any] | None = None,
                            uses: int = 1, ttl_s: float | None = DEFAULT_TOKEN_TTL_S, profile: str | None = None,
                            bind_labels: bool = False) -> tuple[str, EnrollmentToken]:
    """A new enrollment token; returns (plain token — shown once, never stored —, its row)."""
    labels = validate_labels(labels)
    if profile is not None:
        validate_profile(profile)
    if not isinstance(uses, int) or isinstance(uses, bool) or not 1 <= uses <= MAX_TOKEN_USES:
        raise ConfigError(f"uses must be between 1 and {MAX_TOKEN_USES}, got {uses!r}")
    if ttl_s is not None and not ttl_s > 0:
        raise ConfigError(f"ttl_s must be positive (or null for no expiry), got {ttl_s!r}")
    plain = new_secret(ENROLLMENT_TOKEN_PREFIX)
    expires_at = utcnow() + dt.timedelta(seconds=ttl_s) if ttl_s is not None else None
    row = EnrollmentToken(token_hash=hash_secret(plain), labels=labels, uses_left=uses, expires_at=expires_at,
                          created_by=actor, profile=profile, bind_labels=bind_labels)
    session.add(row)
    session.flush()
    audit.record(session, actor, "enrollment_token.create", str(row.id),
                 {"labels": labels, "uses": uses, "expires_at": expires_at.isoformat() if expires_at else None,
                  "profile": profile, "bind_labels": bind_labels})
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
    raise PermissionDenied(f"this enrollment token expired at {as_utc(row.expires_at).isoformat()}")


def _check_binding(session: Session, token_row: EnrollmentToken, device: Device | None, profile: str,
                   asked: dict[str, Any]) -> None:
    """What a bound token, or a revoked device, refuses (the spent use is rolled back)."""
    refusal = None
    if token_row.profile is not None and token_row.profile != profile:
        refusal = f"this enrollment token is for profile {token_row.profile}, not {profile}"
    elif token_row.bind_labels:
        changed = sorted(k for k, v in asked.items() if k in (token_row.labels or {}) and token_row.labels[k] != v)
        if changed:
            refusal = f"this enrollment token sets label(s) {', '.join(changed)}; a device may not change them"
    if refusal is None and device is not None and device.revoked_at is not None:
        revoked_at = as_utc(device.revoked_at)
        if as_utc(token_row.created_at) <= revoked_at:
            refusal = (f"device {device.id} was revoked at {revoked_at.isoformat()}; "
                       "re-enrolling it needs a token created after that")
    if refusal is not None:
        session.rollback()
        raise PermissionDenied(refusal, device_id=device.id if device is not None else None)


def enroll(session: Session, *, token: str, device_id: str, profile: str,
           labels: Mapping[str, Any] | None = None,
           identities: DeviceIdentities | None = None) -> tuple[str, Device, bool]:
    """Enroll a device with a one-time token; returns (plain credential — shown once —, device, created).

    The id is checked with `edgepack.protocol.validate_device_id` (it goes into MQTT topics and URLs).
    An existing id is re-enrolled: new credential, profile and labels; its state is kept. The broker
    (`identities`) gets the device's MQTT identity before the enrollment is committed.
    """
    try:
        validate_device_id(device_id)
        if device_id == FLEET_USERNAME:  # the fleet's own MQTT identity: a device may not take its name
            raise ConfigError(f"device id {device_id!r} is reserved for the fleet", device_id=device_id)
        validate_profile(profile)
        asked = validate_labels(labels)
        if not isinstance(token, str) or not token:
            raise NotAuthenticated("an enrollment token is required")
        token_row = _spend_token(session, token)
        device = session.get(Device, device_id)
        _check_binding(session, token_row, device, profile, asked)
    except Exception:
        metrics.ENROLLMENTS.labels("refused").inc()
        raise
    merged = {**(token_row.labels or {}), **asked}
    credential = new_secret(DEVICE_CREDENTIAL_PREFIX)
    created = device is None
    if device is None:
        device = Device(id=device_id, profile=profile, labels=merged, credential_hash=hash_secret(credential))
        session.add(device)
    else:
        device.profile, device.labels, device.credential_hash = profile, merged, hash_secret(credential)
        device.revoked_at = None
    try:
        (identities or NoBrokerIdentities()).provision(device_id, credential)
    except BrokerUnavailable:
        session.rollback()  # the token's use comes back
        metrics.ENROLLMENTS.labels("refused").inc()
        raise
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
# credential lifecycle


def rotate_credential(session: Session, actor: str, device_id: str,
                      identities: DeviceIdentities | None = None) -> tuple[str, Device]:
    """A new secret for the device's HTTP and MQTT identity (shown once); the old one stops working and an
    MQTT session opened with it is closed. A revoked device is re-enrolled instead."""
    device = get_device(session, device_id)
    if device.revoked_at is not None:
        raise Conflict(f"device {device_id} is revoked; enroll it again with a new token", device_id=device_id)
    credential = new_secret(DEVICE_CREDENTIAL_PREFIX)
    (identities or NoBrokerIdentities()).provision(device_id, credential)
    device.credential_hash = hash_secret(credential)
    audit.record(session, actor, "device.rotate_credential", device_id, {})
    session.commit()
    metrics.CREDENTIAL_CHANGES.labels("rotated").inc()
    return credential, device


def revoke_device(session: Session, actor: str, device_id: str,
                  identities: DeviceIdentities | None = None) -> Device:
    """Stop the device's credential on both planes. The database first: its HTTP credential fails from the
    commit on and the fleet drops its MQTT messages; then the broker deletes its identity, closing its
    session. Revoking again retries the broker (a BrokerUnavailable says the broker part is pending)."""
    device = get_device(session, device_id)
    if device.revoked_at is None:
        device.revoked_at = utcnow()
        # a hash of a secret nobody holds: the credential column stays unique and matches nothing
        device.credential_hash = hash_secret(new_secret(DEVICE_CREDENTIAL_PREFIX))
        device.online = False
        audit.record(session, actor, "device.revoke", device_id, {})
        session.commit()
        metrics.CREDENTIAL_CHANGES.labels("revoked").inc()
    try:
        (identities or NoBrokerIdentities()).revoke(device_id)
    except BrokerUnavailable as exc:
        raise BrokerUnavailable(f"device {device_id} is revoked in the fleet (HTTP refused, its messages dropped), "
                                f"but {exc.message}; run the revocation again", device_id=device_id) from None
    return device


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
    "revoke_device",
    "rotate_credential",
    "list_devices",
    "matches",
    "parse_selector",
    "validate_labels",
    "validate_profile",
]
