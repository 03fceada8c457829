"""What devices tell the fleet: install status and telemetry windows, applied to the database.

A status answers one desired state (`status.seq`). The device row always takes the newest answer; the
rollout member whose desired state it answers (`member.desired_seq == status.seq`) takes its phase.
Anything older than what the device already answered is stale and ignored (a retained status replayed
after a reconnect is the newest one, so re-applying it changes nothing). The last will (`state:
offline`) only marks the device offline: its other fields were fixed when the device connected.

Both functions commit; the MQTT bridge calls them once per message.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgepack.errors import ProtocolError
from edgepack.protocol import DeviceStatus, Telemetry
from fleet.models import Device, RolloutMember, TelemetryWindow
from fleet.services.gates import FAILED_PHASES, TIMED_OUT, utc


def _now(now: float | dt.datetime | None) -> dt.datetime:
    return utc(time.time() if now is None else now)


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise ProtocolError(f"device {device_id!r} is not enrolled", device_id=device_id)
    return device


def _member_phase(member: RolloutMember, status: DeviceStatus) -> str:
    if member.rolled_back and status.phase == "active":
        return "rolled_back"  # active again on the old bundle: the rollback this member was sent is done
    return status.phase


def apply_status(session: Session, status: DeviceStatus, now: float | dt.datetime | None = None) -> bool:
    """Record a device's status; True when it was applied, False when it was stale (then only
    `online`/`last_seen` change).

    Raises ProtocolError for a device that is not enrolled.
    """
    device = _device(session, status.device_id)
    at = _now(now)
    if status.state == "offline":
        device.online = False
        session.commit()
        return True
    device.online = True
    device.last_seen = at
    if status.seq < (device.acked_seq or 0):
        session.commit()  # alive, but answering an older desired state than it already answered
        return False
    device.acked_seq = status.seq
    device.phase = status.phase
    device.current_bundle_id = status.current_bundle
    device.previous_bundle_id = status.previous_bundle
    device.error = status.error
    device.last_status = status.model_dump(mode="json")
    if status.seq > 0:
        # A device's seqs are unique across rollouts, so the seq alone finds the member it answers.
        member = session.scalars(
            select(RolloutMember).where(RolloutMember.device_id == device.id, RolloutMember.desired_seq == status.seq)
        ).first()
        if member is not None and (status.rollout_id is None or status.rollout_id == member.rollout_id):
            phase = _member_phase(member, status)
            # A timed-out member only leaves that phase with a final answer, so it cannot flap back to pending.
            if member.phase != TIMED_OUT or phase == "active" or phase in FAILED_PHASES:
                member.phase = phase
                member.error = status.error or member.error  # the last error this member reported
    session.commit()
    return True


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None: JSON columns (PostgreSQL's above all) refuse
    them, and a gate must never average one in."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def record_telemetry(session: Session, telemetry: Telemetry, now: float | dt.datetime | None = None) -> TelemetryWindow:
    """Store one telemetry window (read by the telemetry gates and the drift alerts). Non-finite numbers are
    stored as null (drift scores that are not finite are left out). Raises ProtocolError for an unknown device."""
    device = _device(session, telemetry.device_id)
    at = _now(now)
    device.last_seen = at
    latency = _finite(telemetry.latency_ms.model_dump())
    window = TelemetryWindow(
        device_id=device.id, bundle_id=telemetry.bundle_id, received_at=at, window_s=telemetry.window_s,
        inferences=telemetry.inferences, errors=telemetry.errors, p50_ms=latency["p50"],
        p95_ms=latency["p95"], p99_ms=latency["p99"],
        drift={name: score for name, score in telemetry.drift.items() if math.isfinite(score)},
        payload=_finite(telemetry.model_dump(mode="json")),
    )
    session.add(window)
    session.commit()
    return window


__all__ = ["apply_status", "record_telemetry"]
