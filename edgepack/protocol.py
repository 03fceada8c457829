"""MQTT protocol v1 between the fleet server and device agents (DESIGN.md "MQTT protocol v1").

    edgepack/v1/devices/{id}/desired     fleet → device, retained      DesiredState
    edgepack/v1/devices/{id}/status      device → fleet, retained, LWT DeviceStatus
    edgepack/v1/devices/{id}/telemetry   device → fleet, per window    Telemetry

Every message carries `schema_version`; `decode` refuses oversized payloads, malformed JSON, unknown
schema versions and invalid fields with a `ProtocolError` (callers log and count it, never crash).
Device ids are a small validated type: MQTT wildcards and separators (`/`, `+`, `#`) can never
reach a topic.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgepack.errors import ProtocolError, first_validation_error

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgepack/v1/devices"
MAX_PAYLOAD_BYTES = 64 * 1024
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

InstallPhase = Literal["idle", "downloading", "verifying", "installing", "selftest", "active", "failed", "rolled_back"]
Action = Literal["install", "rollback", "shadow"]


def validate_device_id(device_id: str) -> str:
    """A device id safe to put in a topic and a path: letters, digits, '.', '_', '-' (at most 128)."""
    if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
        raise ProtocolError(f"invalid device id {device_id!r}: use letters, digits, '.', '_' or '-' (no '/', '+', '#')",
                            device_id=device_id)
    return device_id


def _device_id_field(value: str) -> str:
    try:
        return validate_device_id(value)
    except ProtocolError as exc:
        raise ValueError(exc.message) from None


# A device id as a pydantic field type: messages and configs validate it the same way.
DeviceId = Annotated[str, AfterValidator(_device_id_field)]


def desired_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/{validate_device_id(device_id)}/desired"


def status_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/{validate_device_id(device_id)}/status"


def telemetry_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/{validate_device_id(device_id)}/telemetry"


def parse_topic(topic: str) -> tuple[str, str]:
    """(device_id, kind) of a device topic; ProtocolError for anything else."""
    prefix = TOPIC_ROOT + "/"
    if not topic.startswith(prefix):
        raise ProtocolError(f"not an edgepack device topic: {topic!r}")
    parts = topic[len(prefix):].split("/")
    if len(parts) != 2 or parts[1] not in ("desired", "status", "telemetry"):
        raise ProtocolError(f"malformed device topic: {topic!r}")
    return validate_device_id(parts[0]), parts[1]


# What a device says is stored in INTEGER / BIGINT columns (PostgreSQL's are signed 32/64 bit): a larger
# value would be a database error in the bridge rather than a refused message, so decode refuses it.
MAX_STORED_INT = 2**31 - 1
MAX_BIG_INT = 2**63 - 1


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION


class BundleRef(BaseModel):
    """What a device needs to fetch and check a bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="Bundle id: the sha256 of the .edgepack file.")
    name: str
    version: str
    profile: str
    sha256: str
    size: int = Field(ge=0)
    url: str = Field(description="Download URL (HTTP Range supported); relative URLs are resolved against the fleet URL.")

    @field_validator("id", "sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256.match(value):
            raise ValueError("must be a lower-case sha256 hex digest")
        return value


class DesiredSignature(BaseModel):
    """The fleet's Ed25519 signature over `signing_bytes(desired)` (the state without `sig`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alg: Literal["ed25519"] = "ed25519"
    key_id: str = Field(min_length=1, max_length=64, description="First 16 hex of sha256 over the raw public key.")
    sig: str = Field(min_length=1, max_length=256, description="Base64 of the 64-byte signature.")


class NextFleetKey(BaseModel):
    """The fleet key that will replace the current one (key rotation); inside the signed part, so the current
    key vouches for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alg: Literal["ed25519"] = "ed25519"
    key_id: str = Field(min_length=1, max_length=64)
    public_key: str = Field(min_length=1, max_length=128, description="Base64 of the raw 32-byte Ed25519 public key.")


class DesiredState(_Message):
    """What the fleet wants a device to run; retained, so an offline device converges on reconnect.

    The fleet signs it (`sig`) with its director key over `signing_bytes`: the device it is addressed to,
    the seq, when it was issued and until when it is valid are all inside the signature, so a copy
    cannot be redirected to another device, replayed after it expired, or stripped of its action."""

    rollout_id: str | None = None
    seq: int = Field(ge=0, description="Increases with every new desired state for this device.")
    action: Action
    bundle: BundleRef | None = Field(default=None, description="The bundle to install, roll back to, or shadow.")
    issued_at: float = Field(default=0.0, description="Unix time the fleet issued (or last re-signed) this state.")
    device_id: DeviceId | None = Field(default=None, description="The device this state is addressed to (signed).")
    expires_at: float | None = Field(default=None, description="Unix time after which the device refuses it (signed).")
    next_key: NextFleetKey | None = Field(default=None, description="During a fleet key rotation: the next key "
                                                                    "(signed by the current one); the device pins it too.")
    sig: DesiredSignature | None = Field(default=None, description="The fleet's signature; None: unsigned.")


def signing_bytes(desired: DesiredState) -> bytes:
    """What the fleet signs: canonical JSON (sorted keys, no spaces) of the state without `sig`."""
    document = desired.model_dump(mode="json", exclude={"sig"})
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


class DeviceStatus(_Message):
    """A device's state; retained. The last will publishes `state: offline`."""

    device_id: DeviceId
    state: Literal["online", "offline"] = "online"
    seq: int = Field(default=0, ge=0, le=MAX_STORED_INT, description="The desired-state seq this status answers.")
    rollout_id: str | None = None
    phase: InstallPhase = "idle"
    current_bundle: str | None = Field(default=None, description="Id of the active bundle.")
    previous_bundle: str | None = Field(default=None, description="Id of the bundle in the other slot.")
    shadow_bundle: str | None = None
    profile: str | None = None
    error: str | None = None
    refused_seq: int | None = Field(default=None, ge=0, le=MAX_STORED_INT,
                                    description="Seq of the last desired state the device refused without acting "
                                                "(unsigned, another key or device, expired, a downgrade); `error` says why.")
    fleet_keys: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, max_length=4, description="Key ids of the fleet keys the device pins (two during a rotation).")
    ts: float = 0.0
    agent_version: str | None = None


class LatencySummary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    bounds_ms: list[float] = Field(default_factory=list, description="Histogram bucket upper bounds in ms.")
    counts: list[Annotated[int, Field(ge=0, le=MAX_STORED_INT)]] = Field(
        default_factory=list, description="Counts per bucket; one more than bounds (overflow).")


class Telemetry(_Message):
    """One window of a device's inference statistics (the fleet's telemetry gates read these)."""

    device_id: DeviceId
    window_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$",
                                  description="Unique per device and window: a redelivered window is stored once.")
    bundle_id: str | None = None
    window_s: float = Field(gt=0)
    inferences: int = Field(ge=0, le=MAX_STORED_INT)
    errors: int = Field(ge=0, le=MAX_STORED_INT)
    latency_ms: LatencySummary = LatencySummary()
    drift: dict[str, float] = Field(default_factory=dict, description="Drift score per input/output name.")
    drift_method: str | None = None
    shadow: dict[str, float] | None = None
    rss_bytes: int | None = Field(default=None, ge=0, le=MAX_BIG_INT)
    ts: float = 0.0


M = TypeVar("M", bound=BaseModel)


def encode(message: BaseModel) -> bytes:
    return json.dumps(message.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def decode(model: type[M], payload: bytes | str) -> M:
    """Parse one message; every problem is a ProtocolError with a one-line reason."""
    if isinstance(payload, str):
        payload = payload.encode()
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:  # the common case, a valid message, in pydantic's own parser (half the time of json.loads + validate)
        message = model.model_validate_json(payload)
    except ValidationError:
        pass  # parsed again below, to say what is wrong in the words of this protocol
    else:
        if "schema_version" in message.model_fields_set:  # the field has a default: a message must still name it
            return message
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("payload is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("payload is not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ProtocolError(f"unknown schema_version {version!r} (this side speaks {SCHEMA_VERSION})")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(first_validation_error(exc, f"invalid {model.__name__}")) from None
