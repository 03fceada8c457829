"""What a fleet server is configured with; read from the environment only when asked (`from_env`).

    data_dir       where the SQLite database, the bundle store and `admin.token` live
    db_url         SQLAlchemy URL; None → SQLite at data_dir/fleet.db (`postgresql://…` uses psycopg 3)
    mqtt_url       broker URL (`mqtt://host:port`); None → the server starts an embedded broker
    public_url     base URL devices reach the server at, for bundle download URLs; None → relative URLs
    trusted_keys   `.pub` files whose keys may sign bundles this server accepts
    admin_token    the admin bearer token (EDGEPACK_ADMIN_TOKEN); None → generated on first start
    host, port     where uvicorn listens
    drift_alert_threshold   a device outside any rollout whose worst drift score in a telemetry window exceeds
                   this (default 0.25, PSI's "significant shift") raises a drift alert
    alert_webhook_url       where alerts are POSTed as JSON (the "retrain" trigger); None → only listed
    alert_repeat_s          an open alert is not raised again for the same device, bundle and kind within this
                   many seconds (default 3600); it clears when the score falls back
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from fleet.db import sqlite_url

ENV_PREFIX = "EDGEPACK_"
ADMIN_TOKEN_ENV = "EDGEPACK_ADMIN_TOKEN"
ADMIN_TOKEN_FILE = "admin.token"


class FleetSettings(BaseModel):
    """Settings of one fleet server (frozen: a running server never changes them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(default=Path("fleet-data"), description="SQLite database, bundle store, admin.token.")
    db_url: str | None = Field(default=None, description="Database URL; None means SQLite in data_dir.")
    mqtt_url: str | None = Field(default=None, description="Broker URL; None means an embedded broker.")
    public_url: str | None = Field(default=None, description="Base URL devices use for bundle downloads.")
    trusted_keys: list[Path] = Field(default_factory=list, description="Public keys allowed to sign bundles.")
    admin_token: SecretStr | None = Field(default=None, description="Admin bearer token; None generates one.")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_bundle_bytes: int = Field(default=4 * 1024**3, gt=0, description="Largest bundle upload accepted.")
    drift_alert_threshold: float = Field(default=0.25, gt=0, allow_inf_nan=False,
                                         description="Drift score above which a device outside a rollout raises an alert.")
    alert_webhook_url: str | None = Field(default=None, description="URL alerts are POSTed to as JSON; None: none.")
    gate_settle_s: float = Field(default=0.0, ge=0, allow_inf_nan=False,
                                 description="Seconds after a wave starts whose treatment telemetry the gates do not judge "
                                             "(installs and cold models); 0 judges everything.")
    alert_repeat_s: float = Field(default=3600.0, gt=0, allow_inf_nan=False,
                                  description="Seconds before an open alert for the same device, bundle and kind repeats.")

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

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

    @property
    def database_url(self) -> str:
        return self.db_url or sqlite_url(self.data_dir)

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "bundles"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / ADMIN_TOKEN_FILE

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> FleetSettings:
        """Settings from EDGEPACK_FLEET_DATA_DIR, EDGEPACK_DB_URL, EDGEPACK_MQTT_URL, EDGEPACK_PUBLIC_URL,
        EDGEPACK_TRUSTED_KEYS (os.pathsep-separated), EDGEPACK_ADMIN_TOKEN, EDGEPACK_FLEET_HOST/PORT,
        EDGEPACK_DRIFT_ALERT_THRESHOLD, EDGEPACK_ALERT_WEBHOOK_URL, EDGEPACK_ALERT_REPEAT_S; keyword overrides
        that are not None win (the CLI passes its options this way)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        mapping = {
            "data_dir": "EDGEPACK_FLEET_DATA_DIR",
            "db_url": "EDGEPACK_DB_URL",
            "mqtt_url": "EDGEPACK_MQTT_URL",
            "public_url": "EDGEPACK_PUBLIC_URL",
            "admin_token": ADMIN_TOKEN_ENV,
            "host": "EDGEPACK_FLEET_HOST",
            "port": "EDGEPACK_FLEET_PORT",
            "drift_alert_threshold": "EDGEPACK_DRIFT_ALERT_THRESHOLD",
            "alert_webhook_url": "EDGEPACK_ALERT_WEBHOOK_URL",
            "alert_repeat_s": "EDGEPACK_ALERT_REPEAT_S",
            "gate_settle_s": "EDGEPACK_GATE_SETTLE_S",
        }
        for field, name in mapping.items():
            if env.get(name):
                values[field] = env[name]
        if env.get("EDGEPACK_TRUSTED_KEYS"):
            values["trusted_keys"] = [Path(p) for p in env["EDGEPACK_TRUSTED_KEYS"].split(os.pathsep) if p]
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


__all__ = ["ADMIN_TOKEN_ENV", "ADMIN_TOKEN_FILE", "FleetSettings"]
