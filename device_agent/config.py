"""The device agent's config file (`agent.yaml`), validated before the agent touches anything.

    device_id: cam-017                         # letters, digits, '.', '_', '-'; used in MQTT topics
    profile: rpi4                              # hardware profile name (or one of its aliases)
    fleet_url: http://fleet.local:8000         # enrollment, bundle downloads
    mqtt_url: mqtt://fleet.local:1883          # mqtts:// for TLS; user:password@ in the URL if the broker wants them
    ca_file: /etc/edgepack/ca.pem              # CA the fleet's HTTPS and the mqtts:// broker must chain to (default: system store)
    client_cert: /etc/edgepack/cam-017.pem     # optional client certificate (+ client_key) for a broker that requires one
    enrollment_token: et_…                     # first start only; the credential it buys is kept in state_dir
    state_dir: /var/lib/edgepack-agent
    trusted_keys: [/etc/edgepack/edgepack.pub]
    labels: {site: lab, line: "3"}
    serve: {host: 127.0.0.1, port: 8700}       # HTTP inference; omit (or enabled: false) for the Python API only
    download: {chunk_bytes: 1048576, retries: 5, backoff_s: 0.5, timeout_s: 30, retry_interval_s: 30}
    selftest_timeout_s: 60
    telemetry: {window_s: 10, buffer_max_bytes: 4194304}
    shadow: {sample_rate: 0.1}
    safety: {min_requests: 20, window_s: 120, max_error_rate: 0.5, error_rate_factor: 2,
             crash_loop_restarts: 3, crash_loop_window_s: 300}

Relative paths are relative to the config file's folder. Every problem is one `ConfigError` line
naming the file and the field.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgepack.errors import ConfigError, first_validation_error, validation_error_field
from edgepack.yamlfile import read_yaml_mapping
from edgepack.mqtt import MqttEndpoint
from edgepack.protocol import DeviceId


class ServeConfig(BaseModel):
    """Where the agent serves inference over HTTP; loopback by default. Without `serve` in the config
    the agent serves only its Python API (`Agent.infer`), as simulated fleets of many agents do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="False turns HTTP inference off and keeps the section.")
    host: str = Field(default="127.0.0.1", description="Address the inference server listens on (loopback by default).")
    port: int = Field(default=8700, ge=0, le=65535, description="0 picks a free port.")
    max_body_bytes: int = Field(default=16 << 20, gt=0, le=1 << 30, description="Largest request body accepted (413 above).")


class DownloadConfig(BaseModel):
    """How bundles are fetched: chunk size, retries with exponential backoff, and the retry cadence."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_bytes: int = Field(
        default=1 << 20, gt=0, le=64 << 20,
        description="Bytes read from the HTTP response at a time while downloading a bundle.")
    retries: int = Field(default=5, ge=0, description="Failures in a row without progress before giving up this try.")
    backoff_s: float = Field(default=0.5, ge=0, description="First wait between retries; doubles each time.")
    max_backoff_s: float = Field(default=30.0, ge=0, description="Longest wait between two retries (the doubling stops here).")
    timeout_s: float = Field(default=30.0, gt=0, description="Socket timeout of one HTTP request.")
    retry_interval_s: float = Field(default=30.0, ge=0,
                                    description="After a try gave up on the network, try the same desired state again this much later.")


class TelemetryConfig(BaseModel):
    """How often the agent reports a telemetry window, and how much it keeps on disk while offline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: float = Field(default=10.0, gt=0, le=3600, description="Length of one telemetry window.")
    buffer_max_bytes: int = Field(default=4 << 20, ge=4096,
                                  description="Cap of the on-disk buffer of windows the broker could not take; oldest dropped first.")


class ShadowConfig(BaseModel):
    """Shadow mode: which share of live requests the candidate also runs on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_rate: float = Field(default=0.1, ge=0, le=1, description="Probability that an answered request is also run by the candidate.")
    max_pending: int = Field(default=64, ge=1, description="Samples waiting for the candidate; more are dropped and counted.")


class SafetyConfig(BaseModel):
    """When the agent rolls back by itself (device_agent.safety)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_requests: int = Field(default=20, ge=1, description="Requests of a new bundle before its error rate is judged.")
    window_s: float = Field(default=120.0, gt=0, description="How long after a switch the error rate is watched.")
    max_error_rate: float = Field(default=0.5, ge=0, le=1,
                                  description="Roll back above max(this, error_rate_factor x the previous bundle's rate).")
    error_rate_factor: float = Field(default=2.0, ge=1,
                                     description="Roll back when the new bundle's error rate exceeds this times the previous "
                                                 "bundle's (and max_error_rate).")
    crash_loop_restarts: int = Field(default=3, ge=0,
                                     description="Roll back at start after more crash restarts than this (0: off).")
    crash_loop_window_s: float = Field(default=300.0, gt=0, description="Crash restarts count within this long of a switch.")


class AgentConfig(BaseModel):
    """Everything the agent needs to know about itself; `AgentConfig.from_yaml(path)` reads it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: DeviceId = Field(description="The device's id (letters, digits, '.', '_', '-'): names its MQTT topics and is its "
                                            "MQTT username unless mqtt_url names one.")
    profile: str = Field(min_length=1,
                         description="The device's hardware profile name or alias; sent at enrollment, and a bundle built for "
                                     "another profile is refused.")
    fleet_url: str = Field(description="Base URL of the fleet API (http:// or https://): enrollment, bundle downloads, status "
                                       "over HTTP.")
    mqtt_url: str = Field(description="The broker (mqtt:// or mqtts://, user:password@ if it wants them): desired states in, "
                                      "status and telemetry out.")
    enrollment_token: str | None = Field(default=None,
                                         description="One-use token (edgepack devices enroll-token) traded for a credential at "
                                                     "the first start; unused once state_dir holds one.")
    state_dir: Path = Field(description="The agent's own folder: credential, pinned fleet key, slots a/ and b/, journal, "
                                        "downloads, telemetry buffer, shadow candidate.")
    trusted_keys: list[Path] = Field(min_length=1,
                                     description="Public keys (Ed25519 PEM) whose bundle signatures the agent accepts; at least "
                                                 "one.")
    labels: dict[str, str] = Field(default_factory=dict,
                                   description="Labels sent at enrollment; rollouts select devices by them (site, line …).")
    serve: ServeConfig | None = Field(default=None,
                                      description="HTTP inference; omitted (None): the agent serves only its Python API.")
    download: DownloadConfig = Field(default=DownloadConfig(), description="How bundles are downloaded.")
    selftest_timeout_s: float = Field(default=60.0, gt=0,
                                      description="Seconds a bundle's self-test may take before the install fails.")
    selftest_isolation: Literal["process", "thread"] = Field(
        default="process",
        description="process: a child process that can be killed on timeout and cannot crash the agent; "
                    "thread: in-process (cheaper, for simulated fleets).")
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive interval, seconds.")
    telemetry: TelemetryConfig = Field(default=TelemetryConfig(), description="Telemetry windows and the offline buffer.")
    shadow: ShadowConfig = Field(default=ShadowConfig(),
                                 description="Shadow mode: a candidate bundle runs beside the active one on a sample of "
                                             "requests.")
    safety: SafetyConfig = Field(default=SafetyConfig(), description="When the agent rolls back by itself.")
    ca_file: Path | None = Field(default=None, description="PEM CA the fleet's https:// certificate and the mqtts:// "
                                                           "broker's must chain to; None: the system CA store.")
    client_cert: Path | None = Field(default=None, description="PEM client certificate for a broker that requires one.")
    client_key: Path | None = Field(default=None, description="PEM key of client_cert (omit when client_cert holds both).")
    report_status_over_http: bool = Field(default=False,
                                          description="Also POST every status to {fleet_url}/api/v1/devices/{id}/status.")
    require_signed_desired: bool = Field(default=False,
                                         description="Refuse unsigned desired states even when enrollment pinned no "
                                                     "fleet key (with a pinned key they are always refused).")
    desired_max_age_s: float = Field(default=30 * 24 * 3600.0, gt=0, allow_inf_nan=False,
                                     description="Refuse a signed desired state issued longer ago than this.")

    @field_validator("fleet_url")
    @classmethod
    def _fleet_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value.rstrip("/")

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError("must be an mqtt:// or mqtts:// URL with a host")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not key or any(ch in key for ch in "=,"):
                raise ValueError(f"label key {key!r} must be non-empty without '=' or ','")
        return value

    @classmethod
    def from_yaml(cls, path: Path) -> "AgentConfig":
        """Read and validate `path`; relative paths resolve against its folder."""
        path = Path(path)
        data = read_yaml_mapping(path, "agent config")
        return cls.from_mapping(data, base_dir=path.parent, source=str(path))

    @classmethod
    def from_mapping(cls, data: dict, *, base_dir: Path | None = None, source: str = "agent config") -> "AgentConfig":
        """Validate an already parsed mapping (tests and simulated fleets build configs this way)."""
        data = dict(data)
        # YAML reads `line: 3` as an int; labels are strings on the wire, so accept scalars and say so nowhere.
        if isinstance(data.get("labels"), dict):
            data["labels"] = {str(k): v if isinstance(v, str) else _scalar_label(v) for k, v in data["labels"].items()}
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(first_validation_error(exc, source), field=validation_error_field(exc)) from None
        if base_dir is not None:
            config = config.model_copy(update={
                "state_dir": _resolve(base_dir, config.state_dir),
                "trusted_keys": [_resolve(base_dir, key) for key in config.trusted_keys],
                **{name: _resolve(base_dir, getattr(config, name)) for name in ("ca_file", "client_cert", "client_key")
                   if getattr(config, name) is not None},
            })
        return config

    def mqtt_endpoint(self, **overrides: object) -> MqttEndpoint:
        """The broker as this device reaches it: mqtt_url plus ca_file and the client certificate
        (overrides, e.g. the device's MQTT username and password, win when not None)."""
        return MqttEndpoint.from_url(self.mqtt_url, ca_file=self.ca_file, certfile=self.client_cert,
                                     keyfile=self.client_key, client_id=f"edgepack-agent-{self.device_id}", **overrides)

    def https_context(self) -> ssl.SSLContext | None:
        """The TLS context for the fleet's https:// URLs: ca_file (host name checked) and the client
        certificate; None without either, which leaves urllib to the system CA store."""
        if self.ca_file is None and self.client_cert is None:
            return None
        for name in ("ca_file", "client_cert", "client_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"agent config: {name} {path} does not exist", field=name)
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            if self.client_cert is not None:
                context.load_cert_chain(str(self.client_cert), str(self.client_key) if self.client_key else None)
        except ssl.SSLError as exc:
            raise ConfigError(f"agent config: TLS files cannot be loaded: {exc.reason or exc}", field="ca_file") from None
        return context

    def load_trusted_keys(self) -> list:
        """The trusted Ed25519 public keys (ConfigError naming a missing or malformed one)."""
        from edgepack.signing import load_public_key

        return [load_public_key(path) for path in self.trusted_keys]


def _scalar_label(value: object) -> object:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value  # not a scalar: let validation name the field


def _resolve(base_dir: Path, path: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()
