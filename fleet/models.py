"""The fleet's database schema (SQLAlchemy 2, SQLite by default, PostgreSQL by URL).

Everything a restarted server needs to resume lives here: bundles and their stages, devices and their
last status, rollouts with their wave members, every wave decision with its evidence, telemetry windows,
alerts with their webhook delivery state, the audit log.
Alembic migrations under `fleet/migrations/` create exactly these tables.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Bundle(Base):
    __tablename__ = "bundles"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, doc="sha256 of the .edgepack file")
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(64), index=True)
    runtime: Mapped[str] = mapped_column(String(32))
    precision: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    stage: Mapped[str | None] = mapped_column(String(16), nullable=True, doc="None, staging or production")
    uploaded_by: Mapped[str] = mapped_column(String(128))
    uploaded_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16), doc="viewer, operator or admin")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    scopes: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True,
                                                     doc="Route groups it may call (fleet.auth.SCOPES); None: all its role may")
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True,
                                                           doc="Refused from then on; None never expires")


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    uses_left: Mapped[int] = mapped_column(Integer, default=1)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    profile: Mapped[str | None] = mapped_column(String(64), nullable=True,
                                                doc="The only hardware profile it enrolls; None: any")
    bind_labels: Mapped[bool] = mapped_column(Boolean, default=False,
                                              doc="Devices may add labels but not change the token's")


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    profile: Mapped[str] = mapped_column(String(64), index=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True)
    enrolled_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    phase: Mapped[str] = mapped_column(String(16), default="idle")
    current_bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    previous_bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    acked_seq: Mapped[int] = mapped_column(Integer, default=0, doc="Last desired seq the device answered")
    desired_seq: Mapped[int] = mapped_column(Integer, default=0, doc="Seq of the last desired state published")
    desired: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, doc="The last desired state published")
    last_status: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True,
                                                           doc="Its credential was revoked (HTTP and MQTT)")


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    bundle_id: Mapped[str] = mapped_column(ForeignKey("bundles.id"))
    selector: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    waves: Mapped[list[Any]] = mapped_column(JSON, doc="Cumulative percentages, e.g. [1, 10, 50, 100]")
    gates: Mapped[list[Any]] = mapped_column(JSON, default=list, doc="Gate specs: [{metric, op, threshold, relative_to}]")
    bake_s: Mapped[float] = mapped_column(Float, default=30.0)
    max_bake_s: Mapped[float | None] = mapped_column(Float, nullable=True,
                                                     doc="Longest a wave may stay inconclusive before it pauses; None: the default")
    holdback_percent: Mapped[float] = mapped_column(Float, default=10.0,
                                                    doc="Share of each profile kept on the old bundle through the last wave")
    pacing: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, doc=(
        "max_per_minute, max_concurrent, maintenance windows, late_joiners (fleet.services.pacing); None: unpaced"))
    min_reports: Mapped[int] = mapped_column(Integer, default=1)
    install_timeout_s: Mapped[float] = mapped_column(Float, default=300.0)
    status: Mapped[str] = mapped_column(String(16), index=True, doc="pending running paused succeeded rolled_back aborted")
    current_wave: Mapped[int] = mapped_column(Integer, default=-1,
                                              doc="Index of the wave being deployed or baked; len(waves): the hold-back step")
    wave_started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RolloutMember(Base):
    """A device a rollout touched: which wave, what it ran before, what it reported."""

    __tablename__ = "rollout_members"
    __table_args__ = (UniqueConstraint("rollout_id", "device_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"), index=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    wave_index: Mapped[int] = mapped_column(Integer)
    cohort: Mapped[str] = mapped_column(String(16), default="treatment",
                                        doc="treatment, or holdback: kept on the old bundle through the last wave")
    previous_bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    desired_seq: Mapped[int] = mapped_column(Integer, default=0)
    assigned_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    phase: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    rolled_back: Mapped[bool] = mapped_column(Boolean, default=False)


class RolloutDecision(Base):
    __tablename__ = "rollout_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"), index=True)
    wave_index: Mapped[int] = mapped_column(Integer)
    decision: Mapped[str] = mapped_column(String(16), doc="promote, hold or rollback")
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON)
    actor: Mapped[str] = mapped_column(String(128), default="controller")
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TelemetryWindow(Base):
    """One telemetry window a device reported (read by the telemetry gates)."""

    __tablename__ = "telemetry"

    # the gates read "these devices' windows since the wave started": (device_id, received_at) serves it from the
    # index, in time order, without touching the rest of the table
    __table_args__ = (UniqueConstraint("device_id", "window_key", name="uq_telemetry_device_window"),
                      Index("ix_telemetry_device_received", "device_id", "received_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # no index of its own: the two below start with device_id (one fewer index to keep up per window stored)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    window_key: Mapped[str] = mapped_column(String(72), doc="The device's window_id, else sha256: of the message")
    bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    window_s: Mapped[float] = mapped_column(Float)
    inferences: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p99_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    drift: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class TelemetryRollup(Base):
    """Hourly aggregate of the telemetry windows of one bundle on one hardware profile, written when the raw
    windows age out (fleet.services.retention) and kept far longer than they are."""

    __tablename__ = "telemetry_rollups"
    __table_args__ = (UniqueConstraint("bundle_id", "profile", "hour", name="uq_telemetry_rollup"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    profile: Mapped[str] = mapped_column(String(64))
    hour: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    windows: Mapped[int] = mapped_column(Integer)
    inferences: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    latency_counts: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True,
                                                            doc="Merged counts on LATENCY_BOUNDS_MS (overflow last)")
    drift: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, doc="name -> {sum, n, max}")


class Alert(Base):
    """Something about a device's model that needs a person or a pipeline (kind `drift`: its live inputs or
    outputs drifted from the bundle's reference outside any rollout — the "retrain" trigger).

    An alert is open until `cleared_at`; `delivered` says the webhook accepted it (`attempts`,
    `last_attempt_at` and `last_error` record the tries)."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True, doc="drift")
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    cleared_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    delivered: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, doc="Webhook deliveries tried")
    last_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str | None] = mapped_column(String(128), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
