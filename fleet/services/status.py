"""What devices tell the fleet: install status and telemetry windows, applied to the database.

A status answers one desired state (`status.seq`). The device row always takes the newest answer; the
rollout member whose desired state it answers (`member.desired_seq == status.seq`) takes its phase.
Anything older than what the device already answered is stale and ignored, and so is a status for the same
seq sent before the one applied last (its `ts`, the device's clock: a status that arrived late through
another replica cannot move a member back from `active` to `downloading`) (a retained status replayed
after a reconnect is the newest one, so re-applying it changes nothing). The last will (`state:
offline`) only marks the device offline: its other fields were fixed when the device connected.

`apply_status` and `record_telemetry` commit (one message, one transaction: the API and the tests use
them); the MQTT bridge's writers call `store_batch`, which applies a whole batch of decoded messages in one
transaction (fleet.ingest). A telemetry window is stored once per (device, `window_key`): the key is the
device's `window_id`, else the sha256 of the message as encoded, so a QoS 1 redelivery (the same bytes) or
a window the agent re-sends after a lost PUBACK is not stored twice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from sqlalchemy import bindparam, select, text, tuple_, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from edgepack.errors import ProtocolError
from edgepack.protocol import DeviceStatus, Telemetry, encode
from fleet.models import Device, RolloutMember, TelemetryWindow
from fleet.services.gates import FAILED_PHASES, TIMED_OUT, utc


def _now(now: float | dt.datetime | None) -> dt.datetime:
    return utc(time.time() if now is None else now)


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id, with_for_update=True)  # as store_batch: no lost update
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
    applied = _apply_status(session, _device(session, status.device_id), status, _now(now))
    session.commit()
    return applied


def _apply_status(session: Session, device: Device, status: DeviceStatus, at: dt.datetime,
                  members: dict[tuple[str, int], RolloutMember] | None = None) -> bool:
    """apply_status without the commit, for a device already loaded; `members`: the rollout members of the
    batch's (device, seq) pairs, looked up beforehand (else this status's is queried)."""
    if status.state == "offline":
        device.online = False
        return True
    device.online = True
    device.last_seen = at
    if status.seq < (device.acked_seq or 0):
        return False  # alive, but answering an older desired state than it already answered
    last_ts = (device.last_status or {}).get("ts") or 0.0
    if status.seq == (device.acked_seq or 0) and status.ts and isinstance(last_ts, (int, float)) and status.ts < last_ts:
        # the same desired state, but an earlier step (downloading after active): it arrived late, through
        # another replica or a retried batch; the device's own clock orders its statuses
        return False
    device.acked_seq = status.seq
    device.phase = status.phase
    device.current_bundle_id = status.current_bundle
    device.previous_bundle_id = status.previous_bundle
    device.error = status.error
    device.last_status = status.model_dump(mode="json")
    if status.seq > 0:
        # A device's seqs are unique across rollouts, so the seq alone finds the member it answers.
        if members is not None:
            member = members.get((device.id, status.seq))
        else:
            member = session.scalars(
                select(RolloutMember).where(RolloutMember.device_id == device.id, RolloutMember.desired_seq == status.seq)
            ).first()
        if member is not None and (status.rollout_id is None or status.rollout_id == member.rollout_id):
            phase = _member_phase(member, status)
            # A timed-out member only leaves that phase with a final answer, so it cannot flap back to pending.
            if member.phase != TIMED_OUT or phase == "active" or phase in FAILED_PHASES:
                member.phase = phase
                member.error = status.error or member.error  # the last error this member reported
    return True


def window_key(telemetry: Telemetry, payload: bytes | None = None) -> str:
    """What makes a window unique for its device: the agent's `window_id`, else the sha256 of the message
    as it arrived (`payload`; the canonical encoding when there is none): a redelivery is the same bytes."""
    if telemetry.window_id:
        return telemetry.window_id
    return "sha256:" + hashlib.sha256(payload if payload is not None else encode(telemetry)).hexdigest()[:48]


def _finite_float(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _window_row(device_id: str, telemetry: Telemetry, at: dt.datetime, key: str) -> dict[str, Any]:
    """The telemetry row of one window. Non-finite numbers become null: JSON columns (PostgreSQL's above all)
    refuse them, and a gate must never average one in. `payload` is the window as JSON text, in which
    pydantic's encoder writes every NaN or infinity as null; the PostgreSQL COPY takes the text as it is,
    SQLite's insert parses it back (_insert_windows)."""
    latency = telemetry.latency_ms
    return dict(
        device_id=device_id, window_key=key, bundle_id=telemetry.bundle_id, received_at=at,
        window_s=telemetry.window_s, inferences=telemetry.inferences, errors=telemetry.errors,
        p50_ms=_finite_float(latency.p50), p95_ms=_finite_float(latency.p95), p99_ms=_finite_float(latency.p99),
        drift={name: score for name, score in telemetry.drift.items() if math.isfinite(score)},
        payload=telemetry.model_dump_json(),
    )


@dataclass(frozen=True)
class StoredWindow:
    """A telemetry window store_batch stored, as the drift check reads it (fleet.services.alerts), without
    building an ORM object per window: the row's columns, the payload as its JSON text (parsed only when read),
    and no `id` (the batch does not read its rows back)."""

    device_id: str
    window_key: str
    bundle_id: str | None
    received_at: dt.datetime
    window_s: float
    inferences: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    drift: dict[str, float]
    payload_json: str
    id: int | None = None

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.payload_json)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "StoredWindow":
        return cls(**{name: row[name] for name in _STORED_FIELDS}, payload_json=row["payload"])


_COPY_COLUMNS = ("device_id", "window_key", "bundle_id", "received_at", "window_s", "inferences", "errors", "p50_ms",
                 "p95_ms", "p99_ms", "drift", "payload")
_DRIFT_AT = _COPY_COLUMNS.index("drift")
_STORED_FIELDS = tuple(name for name in _COPY_COLUMNS if name != "payload")


def _stored_keys(session: Session, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (device_id, window_key) pairs are stored already: one query. On PostgreSQL the keys go
    as two arrays joined against the table (an index probe per key and partition); SQLite takes the IN list."""
    if session.get_bind().dialect.name == "postgresql":
        rows = session.execute(text(
            "SELECT t.device_id, t.window_key FROM telemetry t "
            "JOIN unnest(CAST(:devices AS varchar[]), CAST(:keys AS varchar[])) AS k(device_id, window_key) "
            "ON t.device_id = k.device_id AND t.window_key = k.window_key"),
            {"devices": [d for d, _ in keys], "keys": [k for _, k in keys]})
    else:
        rows = session.execute(select(TelemetryWindow.device_id, TelemetryWindow.window_key)
                               .where(tuple_(TelemetryWindow.device_id, TelemetryWindow.window_key).in_(keys)))
    return {(device_id, key) for device_id, key in rows}


def _copy_windows(session: Session, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL: the rows in one COPY, on the session's own connection and transaction (several times
    faster than a multi-row INSERT for a batch of hundreds)."""
    connection = session.connection().connection.driver_connection
    with connection.cursor() as cursor:
        with cursor.copy(f"COPY telemetry ({', '.join(_COPY_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                values = [row[c] for c in _COPY_COLUMNS]
                values[_DRIFT_AT] = json.dumps(values[_DRIFT_AT], allow_nan=False)  # the payload is JSON text already
                copy.write_row(values)


def _insert_windows(session: Session, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert the rows whose (device_id, window_key) is not stored yet; returns those inserted. One
    statement for the lookup and one for the insert (COPY on PostgreSQL). The caller holds the rows' devices
    FOR UPDATE, so a replica storing the same redelivered window waits and then finds it. SQLite also has the
    unique constraint (ON CONFLICT DO NOTHING); PostgreSQL's partitioned table cannot have one without the
    partition key (fleet.partitions), and the lookup under the lock is what keeps a window once there."""
    if not rows:
        return []
    unique: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:  # the same window twice in one batch: the first one counts
        unique.setdefault((row["device_id"], row["window_key"]), row)
    stored = _stored_keys(session, list(unique))
    fresh = [row for pair, row in unique.items() if pair not in stored]
    if not fresh:
        return []
    if session.get_bind().dialect.name == "postgresql":
        session.flush()  # the batch's device changes go first, as they would with an ORM insert
        _copy_windows(session, fresh)
    else:
        session.execute(sqlite.insert(TelemetryWindow).on_conflict_do_nothing(index_elements=["device_id", "window_key"]),
                        [{**row, "payload": json.loads(row["payload"])} for row in fresh])
    return fresh


def record_telemetry(session: Session, telemetry: Telemetry, now: float | dt.datetime | None = None,
                     payload: bytes | None = None) -> TelemetryWindow | None:
    """Store one telemetry window (read by the telemetry gates and the drift alerts). Non-finite numbers are
    stored as null (drift scores that are not finite are left out). Returns the stored window, or None when
    this window (its `window_key`) was stored before. Raises ProtocolError for an unknown device."""
    device = _device(session, telemetry.device_id)
    at = _now(now)
    device.last_seen = at
    key = window_key(telemetry, payload)
    inserted = _insert_windows(session, [_window_row(device.id, telemetry, at, key)])
    session.commit()
    if not inserted:
        return None
    return session.scalars(select(TelemetryWindow).where(TelemetryWindow.device_id == device.id,
                                                         TelemetryWindow.window_key == key)).one()


def _set_last_seen(session: Session, last_seen: dict[str, dt.datetime]) -> None:
    """Set these devices' last_seen (rows this transaction holds FOR UPDATE) in one statement: on
    PostgreSQL an UPDATE joined to two arrays, elsewhere one executemany."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(
            "UPDATE devices AS d SET last_seen = v.at "
            "FROM unnest(CAST(:ids AS varchar[]), CAST(:ats AS timestamptz[])) AS v(id, at) WHERE d.id = v.id"),
            {"ids": list(last_seen), "ats": list(last_seen.values())})
    else:
        table = Device.__table__
        session.connection().execute(
            update(table).where(table.c.id == bindparam("b_id")).values(last_seen=bindparam("b_at")),
            [{"b_id": device_id, "b_at": at} for device_id, at in last_seen.items()])


@dataclass
class Inbound:
    """One decoded device message on its way to the database (fleet.ingest queues these)."""

    kind: str  # "status" or "telemetry"
    message: DeviceStatus | Telemetry
    received_at: dt.datetime
    payload: bytes | None = None
    topic: str = ""
    ack: Any = None  # called once the message is stored (or dropped for good): the MQTT PUBACK


@dataclass
class BatchOutcome:
    """What `store_batch` did with each message, in order: `status`, `telemetry`, `duplicate`, `stale`
    (an older status: only liveness changed) or `dropped:<reason>`; and the windows it stored."""

    outcomes: list[str] = field(default_factory=list)
    windows: list[StoredWindow] = field(default_factory=list)


def store_batch(session: Session, items: Sequence[Inbound]) -> BatchOutcome:
    """Apply a batch of decoded messages in one transaction (committed here): statuses in arrival order,
    telemetry windows in one multi-row insert. Messages of devices that are not enrolled or were revoked are
    dropped (`dropped:unknown_device`, `dropped:revoked_device`); nothing else is."""
    ids = {item.message.device_id for item in items}
    # Lock the batch's device rows, in id order, before reading them. Replicas consume one shared
    # subscription, so one device's `downloading` and `active` can be stored by two transactions at once;
    # without the lock both read the row as it was and the one committing last wins, whichever it is (a
    # member stuck in `downloading`). With it the second waits and then reads what the first committed, and
    # the device-ts rule above orders them. One order for every writer: no deadlock. (SQLite: one writer.)
    # Only the three columns telemetry needs are read for every device; the devices a status changes are
    # loaded whole (already locked), and the others' last_seen is set in one statement at the end: most
    # batches are telemetry, and an ORM row per window was most of a batch's time.
    known = {row.id: row for row in session.execute(
        select(Device.id, Device.revoked_at, Device.last_seen).where(Device.id.in_(ids)).order_by(Device.id)
        .with_for_update())}
    status_ids = [device_id for device_id in {item.message.device_id for item in items if item.kind == "status"}
                  if device_id in known]
    devices = ({device.id: device for device in session.scalars(select(Device).where(Device.id.in_(status_ids)))}
               if status_ids else {})
    # the rollout members the statuses answer, in one query (one per status would also flush the batch's
    # device changes before each)
    wanted = list({(item.message.device_id, item.message.seq) for item in items
                   if item.kind == "status" and item.message.seq > 0 and item.message.device_id in devices})
    members: dict[tuple[str, int], RolloutMember] = {}
    if wanted:
        for member in session.scalars(select(RolloutMember).where(
                tuple_(RolloutMember.device_id, RolloutMember.desired_seq).in_(wanted)).order_by(RolloutMember.id)):
            members.setdefault((member.device_id, member.desired_seq), member)
    outcome = BatchOutcome()
    rows: list[dict[str, Any]] = []
    row_index: list[int] = []
    last_seen: dict[str, dt.datetime] = {}  # telemetry-only devices: their new last_seen
    with session.no_autoflush:
        for item in items:
            device_id = item.message.device_id
            row = known.get(device_id)
            if row is None:
                outcome.outcomes.append("dropped:unknown_device")
                continue
            if row.revoked_at is not None:
                outcome.outcomes.append("dropped:revoked_device")
                continue
            device = devices.get(device_id)
            if item.kind == "status":
                applied = _apply_status(session, device, item.message, item.received_at, members)
                outcome.outcomes.append("status" if applied else "stale")
                continue
            if device is not None:
                device.last_seen = max(utc(device.last_seen) or item.received_at, item.received_at)
            else:
                seen = last_seen.get(device_id) or utc(row.last_seen) or item.received_at
                last_seen[device_id] = max(seen, item.received_at)
            row_index.append(len(outcome.outcomes))
            outcome.outcomes.append("telemetry")
            rows.append(_window_row(device_id, item.message, item.received_at, window_key(item.message, item.payload)))
    if last_seen:
        _set_last_seen(session, last_seen)
    inserted = {(row["device_id"], row["window_key"]) for row in _insert_windows(session, rows)}
    seen: set[tuple[str, str]] = set()
    for index, row in zip(row_index, rows):
        pair = (row["device_id"], row["window_key"])
        if pair not in inserted or pair in seen:
            outcome.outcomes[index] = "duplicate"
        else:
            seen.add(pair)
            outcome.windows.append(StoredWindow.from_row(row))
    session.commit()
    return outcome


__all__ = ["BatchOutcome", "Inbound", "StoredWindow", "apply_status", "record_telemetry", "store_batch", "window_key"]
