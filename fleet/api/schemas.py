"""Request and response bodies of the fleet API: `…Create`/`…Request` in, `…Public` out.

Responses are built from ORM rows (`from_attributes`); secrets appear only in the `…Created` bodies
of the request that made them. Every request field is bounded (strings by their column, lists and
label maps by count, numbers by range, no inf/NaN), so no value a client sends reaches the database
unchecked (see `fleet.api.params`).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, computed_field

from edgepack.protocol import DeviceStatus
from edgepack.selectors import MAX_LABELS
from fleet.api.params import MAX_ROW_ID
from fleet.auth import Scope
from fleet.director import FleetKeyPublic
from fleet.services.bundles import download_path
from fleet.services.tokens import MAX_TTL_S


def _utc(value: dt.datetime) -> dt.datetime:
    # SQLite returns naive timestamps; the server stores UTC, so say so on the way out.
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


UtcDateTime = Annotated[dt.datetime, AfterValidator(_utc)]

# Caps on what reaches the services, whose grammar checks (edgepack.selectors: keys and values of at
# most 63; device ids of at most 128, profiles 64) refuse tighter with a 400 naming the value.
_CAP = 256
LabelKey = Annotated[str, StringConstraints(max_length=_CAP)]
LabelValue = Annotated[str, StringConstraints(max_length=_CAP)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_LABELS)]
WEEK_S = 7 * 24 * 3600.0


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --- bundles


class TelemetryRollupPublic(BaseModel):
    """One hour of a bundle's telemetry on one hardware profile, kept after the raw windows aged out."""

    bundle_id: str | None
    profile: str
    hour: str = Field(description="Start of the hour, UTC, ISO 8601")
    windows: int
    inferences: int
    errors: int
    error_rate: float | None
    latency_ms: dict[str, float | None] = Field(description="p50/p95/p99 from the merged histogram (absent: none sent)")
    drift: dict[str, dict[str, float | None]] = Field(description="Per input/output name: mean and max drift score")


class BundlePublic(_Public):
    id: str = Field(description="sha256 of the .edgepack file")
    name: str
    version: str
    profile: str
    runtime: str
    precision: str
    size_bytes: int
    key_id: str = Field(description="Id of the key that signed the manifest")
    stage: str | None
    uploaded_by: str
    uploaded_at: UtcDateTime

    @computed_field
    @property
    def sha256(self) -> str:
        return self.id

    @computed_field
    @property
    def download_url(self) -> str:
        return download_path(self.id)


class BundleDetail(BundlePublic):
    manifest: dict[str, Any]


class PromoteRequest(_Request):
    stage: Literal["staging", "production"]


# --- devices


class EnrollmentTokenCreate(_Request):
    labels: Labels = Field(default_factory=dict, description="Labels every device enrolled with it gets")
    uses: int = Field(default=1, ge=1, le=1_000_000)
    ttl_s: float | None = Field(default=24 * 3600.0, gt=0, le=MAX_TTL_S,
                                description="Lifetime in seconds; null never expires")
    profile: str | None = Field(default=None, max_length=64,
                                description="The only hardware profile devices may enroll with it; null: any")
    bind_labels: bool = Field(default=False, description="Devices may add labels but not change the token's")


class EnrollmentTokenCreated(BaseModel):
    id: int
    token: str = Field(description="Shown once; only its hash is stored")
    labels: dict[str, str]
    uses: int
    expires_at: UtcDateTime | None


class EnrollRequest(_Request):
    device_id: str = Field(max_length=_CAP)
    profile: str = Field(max_length=_CAP)
    labels: Labels = Field(default_factory=dict)
    token: str = Field(max_length=256, description="An enrollment token")


class EnrollResponse(BaseModel):
    device_id: str
    credential: str = Field(description="The device's bearer credential; shown once")
    profile: str
    labels: dict[str, str]
    reenrolled: bool
    fleet_key: FleetKeyPublic = Field(description="The key every desired state for this device is signed with")


class CredentialRotated(BaseModel):
    device_id: str
    credential: str = Field(description="The device's new secret (HTTP bearer and MQTT password); shown once")


class DevicePublic(_Public):
    id: str
    profile: str
    labels: dict[str, Any]
    enrolled_at: UtcDateTime
    last_seen: UtcDateTime | None
    online: bool
    phase: str
    current_bundle_id: str | None
    previous_bundle_id: str | None
    acked_seq: int
    desired_seq: int
    desired: dict[str, Any] | None
    last_status: dict[str, Any] | None
    error: str | None
    revoked_at: UtcDateTime | None = None


class StatusReport(DeviceStatus):
    """A DeviceStatus as the HTTP route takes it: the same message, each field bounded by the column it
    is stored in (the seq by the INTEGER of `desired_seq`)."""

    seq: int = Field(default=0, ge=0, le=MAX_ROW_ID, description="The desired-state seq this status answers.")
    rollout_id: str | None = Field(default=None, max_length=36)
    current_bundle: str | None = Field(default=None, max_length=64, description="Id of the active bundle.")
    previous_bundle: str | None = Field(default=None, max_length=64, description="Id of the bundle in the other slot.")
    shadow_bundle: str | None = Field(default=None, max_length=64)
    profile: str | None = Field(default=None, max_length=64)
    error: str | None = Field(default=None, max_length=4096)
    ts: float = Field(default=0.0, allow_inf_nan=False)
    agent_version: str | None = Field(default=None, max_length=64)


class StatusAccepted(BaseModel):
    device_id: str
    applied: bool = Field(description="False when the status answered an older desired state (stale)")


# --- tokens and audit


class TokenCreate(_Request):
    name: str = Field(min_length=1, max_length=128)
    role: Literal["viewer", "operator", "admin"]
    scopes: list[Scope] | None = Field(default=None, max_length=16,
                                       description="Route groups it may call, each within its role; null: all")
    ttl_s: float | None = Field(default=None, gt=0, le=MAX_TTL_S, description="Lifetime in seconds; null never expires")


class TokenPublic(_Public):
    id: int
    name: str
    role: str
    scopes: list[str] | None = Field(description="Null: every scope its role allows")
    revoked: bool
    created_at: UtcDateTime
    expires_at: UtcDateTime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="Shown once; only its hash is stored")


class AuditEntryPublic(_Public):
    id: int
    at: UtcDateTime
    actor: str
    action: str
    target: str | None
    details: dict[str, Any]


# --- rollouts


class MaintenanceWindow(_Request):
    selector: Labels = Field(default_factory=dict, description="Devices this window applies to ({} : all)")
    start: Annotated[str, StringConstraints(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")] = Field(description="HH:MM local time")
    end: Annotated[str, StringConstraints(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")] = Field(
        description="HH:MM local time; before start: the window spans midnight")
    tz: Annotated[str, StringConstraints(max_length=64)] = Field(default="UTC", description="IANA time zone, e.g. Europe/Berlin")


class RolloutCreate(_Request):
    bundle_id: str = Field(max_length=64, description="Bundle id or an unambiguous prefix (8+ hex digits)")
    selector: Labels | Annotated[str, StringConstraints(max_length=4096)] = Field(
        default_factory=dict, description="{k: v} or 'k=v,k2=v2'")
    waves: list[Annotated[float, Field(ge=0, le=100)]] = Field(default_factory=lambda: [1, 10, 50, 100],
                                                              min_length=1, max_length=100)
    gates: list[Annotated[str, StringConstraints(max_length=256)] | Annotated[dict[str, Any], Field(max_length=8)]] = Field(
        default_factory=list, max_length=32, description="e.g. 'install_failure_ratio<=0.1'; empty → defaults")
    bake_s: float = Field(default=30.0, ge=0, le=WEEK_S)
    max_bake_s: float | None = Field(default=None, ge=0, le=WEEK_S, description=(
        "Longest a wave may stay inconclusive before the rollout pauses; default ten bake times, at least bake + 60 s"))
    holdback_percent: float = Field(default=10.0, ge=0, lt=100, description=(
        "Share of each profile kept on the old bundle through the last wave as its control (rollouts with relative gates)"))
    min_reports: int = Field(default=1, ge=0, le=1_000_000)
    install_timeout_s: float = Field(default=300.0, gt=0, le=WEEK_S)
    max_per_minute: int | None = Field(default=None, ge=1, le=1_000_000, description="Start at most this many devices a minute")
    max_concurrent: int | None = Field(default=None, ge=1, le=1_000_000,
                                       description="At most this many devices installing (downloading) at once")
    maintenance_windows: list[MaintenanceWindow] = Field(default_factory=list, max_length=64, description=(
        "Devices matching a window's selector start only inside it; the first matching window applies"))
    late_joiners: Literal["current_wave", "last_wave", "none"] = Field(default="current_wave", description=(
        "Devices that enroll or start matching the selector mid-rollout: join the wave in progress, wait for the last, or not"))


RolloutAction = Literal["pause", "resume", "abort", "rollback"]


# --- alerts


class AlertPublic(_Public):
    id: int
    at: UtcDateTime
    kind: str = Field(description="drift")
    device_id: str
    bundle_id: str | None
    details: dict[str, Any] = Field(description="For drift: score, threshold, worst, scores, drift_method, profile, bundle, window")
    cleared_at: UtcDateTime | None = Field(description="When the condition passed; null while the alert is open")
    delivered: bool = Field(description="The webhook accepted it")
    delivered_at: UtcDateTime | None
    attempts: int = Field(description="Webhook deliveries tried")
    last_error: str | None

    @computed_field
    @property
    def open(self) -> bool:
        return self.cleared_at is None
