"""What a fleet server is configured with; read from the environment only when asked (`from_env`).

Every setting the server reads is a field here, and every field names its environment variable
(`EDGEPACK_…`, see `env_var`); `edgepack fleet serve` has an option for each (named as the field), whose
value wins over the environment. `tests/fleet/test_settings.py` keeps the three in step.

    data_dir       where the SQLite database, the bundle store, `admin.token` and `mqtt-client-id` live
    db_url         SQLAlchemy URL; None → SQLite at data_dir/fleet.db (`postgresql://…` uses psycopg 3)
    mqtt_url       broker URL (`mqtt://host:port`); None → the server starts an embedded broker on
                   `embedded_mqtt_port`
    mqtt_client_id the bridge's MQTT client id; None → one generated on first start and kept in
                   data_dir/mqtt-client-id, so a restarted server resumes its broker session
    mqtt_persistent_session  True (default): clean_session=False, the broker queues QoS 1 telemetry for the
                   server while it is down and delivers it when it comes back
    mqtt_share_group  replicas on one database and broker set the same group: each consumes its share of the
                   device messages through `$share/<group>/…` (one rollout controller runs among them, fleet.leader)
    mqtt_ca, mqtt_cert, mqtt_key  with an mqtts:// broker: the CA its certificate must chain to (None: the system
                   store) and the client certificate to present, if the broker asks for one
    mqtt_dynsec    the broker is Mosquitto with the dynamic security plugin: device identities are created in it
                   as devices enroll and deleted when they are revoked (the embedded broker reads the database)
    device_message_rate, device_message_burst  one device's MQTT message budget; the fleet ignores the rest
    ingest_queue, ingest_batch, ingest_writers  how decoded status and telemetry reach the database: writer
                   threads store batches in one transaction each (fleet.ingest)
    telemetry_retention_days, rollup_retention_days, maintenance_interval_s  raw windows are rolled up into
                   hourly aggregates and deleted after the first, aggregates after the second
                   (fleet.services.retention), checked every maintenance_interval_s
    tls_cert, tls_key       PEM certificate and key: the API is served over HTTPS (uvicorn's TLS); None → HTTP
    public_url     base URL devices reach the server at, for bundle download URLs; None → relative URLs
    trusted_keys   `.pub` files whose keys may sign bundles this server accepts
    admin_token    the admin bearer token (EDGEPACK_ADMIN_TOKEN); None → generated on first start
    host, port     where uvicorn listens
    controller_interval_s   seconds between two passes of the rollout controller
    drift_alert_threshold   a device outside any rollout whose worst drift score in a telemetry window exceeds
                   this (default 0.25, PSI's "significant shift") raises a drift alert
    alert_webhook_url       where alerts are POSTed as JSON (the "retrain" trigger); None → only listed
    alert_repeat_s          an open alert is not raised again for the same device, bundle and kind within this
                   many seconds (default 3600); it clears when the score falls back
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from edgepack.errors import ConfigError
from edgepack.files import atomic_write
from edgepack.mqtt import MqttEndpoint
from fleet.db import sqlite_url

ENV_PREFIX = "EDGEPACK_"
ADMIN_TOKEN_ENV = "EDGEPACK_ADMIN_TOKEN"
ADMIN_TOKEN_FILE = "admin.token"
MQTT_CLIENT_ID_FILE = "mqtt-client-id"
# Fields holding a list are one environment variable split by os.pathsep (as PATH is).
_LIST_FIELDS = ("trusted_keys",)


def _field(default: Any = ..., *, env: str, description: str, **constraints: Any) -> Any:
    """A settings field that names its environment variable (read by `FleetSettings.from_env`)."""
    return Field(default, description=description, json_schema_extra={"env": env}, **constraints)


class FleetSettings(BaseModel):
    """Settings of one fleet server (frozen: a running server never changes them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = _field(Path("fleet-data"), env="EDGEPACK_FLEET_DATA_DIR",
                            description="SQLite database, bundle store, admin.token, mqtt-client-id.")
    db_url: str | None = _field(None, env="EDGEPACK_DB_URL", description="Database URL; None means SQLite in data_dir.")
    mqtt_url: str | None = _field(None, env="EDGEPACK_MQTT_URL", description="Broker URL; None means an embedded broker.")
    embedded_mqtt_port: int = _field(1883, env="EDGEPACK_EMBEDDED_MQTT_PORT", ge=0, le=65535,
                                     description="Port of the embedded broker (used only without mqtt_url).")
    mqtt_client_id: str | None = _field(None, env="EDGEPACK_MQTT_CLIENT_ID", min_length=1, max_length=200,
                                        description="The bridge's MQTT client id; None: generated once, kept in data_dir.")
    mqtt_persistent_session: bool = _field(True, env="EDGEPACK_MQTT_PERSISTENT_SESSION",
                                           description="Keep the broker session (and the QoS 1 messages queued in it) "
                                                       "across restarts; False asks for a clean session.")
    mqtt_share_group: str | None = _field(None, env="EDGEPACK_MQTT_SHARE_GROUP", min_length=1, max_length=64,
                                          pattern=r"^[A-Za-z0-9._-]+$",
                                          description="Consume device messages through the shared subscription "
                                                      "$share/<group>/…: replicas with one group split the load.")
    mqtt_ca: Path | None = _field(None, env="EDGEPACK_MQTT_CA",
                                  description="CA file the mqtts:// broker's certificate must chain to; None: system store.")
    mqtt_cert: Path | None = _field(None, env="EDGEPACK_MQTT_CERT",
                                    description="Client certificate for a broker that requires one (PEM).")
    mqtt_key: Path | None = _field(None, env="EDGEPACK_MQTT_KEY", description="Key of mqtt_cert (PEM).")
    mqtt_dynsec: bool = _field(False, env="EDGEPACK_MQTT_DYNSEC",
                               description="The broker is Mosquitto with the dynamic security plugin (edgepack fleet "
                                           "broker-config): the fleet creates and deletes device identities in it.")
    device_message_rate: float = _field(20.0, env="EDGEPACK_DEVICE_MESSAGE_RATE", gt=0, allow_inf_nan=False,
                                        description="MQTT messages a second one device may send before the fleet "
                                                    "ignores the rest (token bucket).")
    device_message_burst: float = _field(200.0, env="EDGEPACK_DEVICE_MESSAGE_BURST", ge=1, allow_inf_nan=False,
                                         description="Messages one device may send at once above its rate.")
    ingest_queue: int = _field(20_000, env="EDGEPACK_INGEST_QUEUE", ge=1,
                               description="Decoded device messages waiting for a writer; a full queue holds the "
                                           "MQTT thread back (the broker queues), it never drops.")
    ingest_batch: int = _field(500, env="EDGEPACK_INGEST_BATCH", ge=1, le=5000,
                               description="Messages one writer stores in one transaction at most.")
    ingest_writers: int | None = _field(None, env="EDGEPACK_INGEST_WRITERS", ge=1, le=16,
                                        description="Writer threads; None: 1 on SQLite (one writer at a time "
                                                    "anyway), 2 on PostgreSQL.")
    telemetry_retention_days: float = _field(30.0, env="EDGEPACK_TELEMETRY_RETENTION_DAYS", gt=0, allow_inf_nan=False,
                                             description="Days raw telemetry windows are kept; older ones are rolled "
                                                         "up into hourly aggregates and deleted.")
    rollup_retention_days: float = _field(400.0, env="EDGEPACK_ROLLUP_RETENTION_DAYS", gt=0, allow_inf_nan=False,
                                          description="Days the hourly telemetry aggregates are kept.")
    maintenance_interval_s: float = _field(3600.0, env="EDGEPACK_MAINTENANCE_INTERVAL_S", gt=0, allow_inf_nan=False,
                                           description="Seconds between two retention passes of the server.")
    bundle_store: str | None = _field(None, env="EDGEPACK_BUNDLE_STORE", pattern=r"^s3://[^/\s]+(/\S*)?$",
                                      description="s3://BUCKET[/PREFIX]: keep bundles in an S3-compatible bucket and "
                                                  "send devices presigned URLs; None: the bundles folder in data_dir.")
    s3_endpoint_url: str | None = _field(None, env="EDGEPACK_S3_ENDPOINT_URL",
                                         description="The S3-compatible server (MinIO, Ceph RGW, R2, …); None: AWS. "
                                                     "Credentials come from boto3's chain (AWS_ACCESS_KEY_ID, …).")
    s3_region: str | None = _field(None, env="EDGEPACK_S3_REGION", description="The bucket's region; None: us-east-1.")
    presign_expires_s: int = _field(900, env="EDGEPACK_PRESIGN_EXPIRES_S", ge=1, le=604_800,
                                    description="Lifetime of a presigned bundle URL; an agent whose URL expired "
                                                "asks the fleet's download route for a fresh one.")
    tls_cert: Path | None = _field(None, env="EDGEPACK_TLS_CERT", description="Certificate (PEM) to serve the API over HTTPS.")
    tls_key: Path | None = _field(None, env="EDGEPACK_TLS_KEY", description="Key (PEM) of tls_cert.")
    public_url: str | None = _field(None, env="EDGEPACK_PUBLIC_URL", description="Base URL devices use for bundle downloads.")
    trusted_keys: list[Path] = _field([], env="EDGEPACK_TRUSTED_KEYS",
                                      description="Public keys allowed to sign bundles (env: split by os.pathsep).")
    admin_token: SecretStr | None = _field(None, env=ADMIN_TOKEN_ENV, description="Admin bearer token; None generates one.")
    host: str = _field("127.0.0.1", env="EDGEPACK_FLEET_HOST", description="Address the HTTP API listens on.")
    port: int = _field(8080, env="EDGEPACK_FLEET_PORT", ge=0, le=65535, description="HTTP port (0: any free one).")
    max_bundle_bytes: int = _field(4 * 1024**3, env="EDGEPACK_MAX_BUNDLE_BYTES", gt=0,
                                   description="Largest bundle upload accepted.")
    controller_interval_s: float = _field(1.0, env="EDGEPACK_CONTROLLER_INTERVAL_S", gt=0, allow_inf_nan=False,
                                          description="Seconds between two passes of the rollout controller.")
    drift_alert_threshold: float = _field(0.25, env="EDGEPACK_DRIFT_ALERT_THRESHOLD", gt=0, allow_inf_nan=False,
                                          description="Drift score above which a device outside a rollout raises an alert.")
    alert_webhook_url: str | None = _field(None, env="EDGEPACK_ALERT_WEBHOOK_URL",
                                           description="URL alerts are POSTed to as JSON; None: none.")
    alert_repeat_s: float = _field(3600.0, env="EDGEPACK_ALERT_REPEAT_S", gt=0, allow_inf_nan=False,
                                   description="Seconds before an open alert for the same device, bundle and kind repeats.")

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_is_http(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"S3 endpoint {value!r}: expected an http:// or https:// URL")
        return value.strip().rstrip("/")

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook_is_http(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"alert webhook {value!r}: expected an http:// or https:// URL")
        return value.strip()

    @field_validator("admin_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 16:
            raise ValueError("admin token must be at least 16 characters")
        return value

    @model_validator(mode="after")
    def _key_with_cert(self) -> "FleetSettings":
        if (self.tls_key is None) != (self.tls_cert is None):
            raise ValueError("tls_cert and tls_key go together: give both (HTTPS) or neither (HTTP)")
        return self

    @property
    def https(self) -> bool:
        return self.tls_cert is not None

    def mqtt_endpoint(self) -> MqttEndpoint:
        """The broker as the fleet's bridge reaches it: the URL plus the TLS files configured here."""
        if not self.mqtt_url:
            raise ConfigError("settings.mqtt_url is not set: the fleet server needs an MQTT broker")
        return MqttEndpoint.from_url(self.mqtt_url, ca_file=self.mqtt_ca, certfile=self.mqtt_cert, keyfile=self.mqtt_key)

    @property
    def database_url(self) -> str:
        return self.db_url or sqlite_url(self.data_dir)

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "bundles"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / ADMIN_TOKEN_FILE

    @property
    def mqtt_client_id_file(self) -> Path:
        return self.data_dir / MQTT_CLIENT_ID_FILE

    @classmethod
    def env_var(cls, field: str) -> str:
        """The environment variable a field is read from."""
        return cls.model_fields[field].json_schema_extra["env"]  # type: ignore[index]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> FleetSettings:
        """Settings from each field's environment variable (`env_var`; EDGEPACK_TRUSTED_KEYS is split by
        os.pathsep); keyword overrides that are not None win (the CLI passes its options this way)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in cls.model_fields:
            raw = env.get(cls.env_var(field))
            if not raw:
                continue
            values[field] = [Path(p) for p in raw.split(os.pathsep) if p] if field in _LIST_FIELDS else raw
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


def resolve_mqtt_client_id(settings: FleetSettings) -> str:
    """The configured client id, else the one this server generated on its first start (kept in the data
    folder): the same id after a restart is what lets the broker hand the server its queued session."""
    if settings.mqtt_client_id:
        return settings.mqtt_client_id
    path = settings.mqtt_client_id_file
    if path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    # Host name plus randomness: two servers started from copies of one empty data folder still differ.
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_")[:40] or "host"
    client_id = f"edgepack-fleet-{host}-{secrets.token_hex(4)}"
    atomic_write(path, client_id + "\n")
    return client_id


__all__ = ["ADMIN_TOKEN_ENV", "ADMIN_TOKEN_FILE", "MQTT_CLIENT_ID_FILE", "FleetSettings", "resolve_mqtt_client_id"]
