"""Fleet settings: every setting the server reads is a declared field with an environment variable and a
`fleet serve` option, options win over the environment, and the MQTT client id is stable per data folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import typer

from fleet.cli.server import app as server_app
from fleet.settings import FleetSettings, resolve_mqtt_client_id

REPO = Path(__file__).resolve().parents[2]
# Fields `fleet serve` deliberately has no option for, and why.
NO_OPTION = {"admin_token": "a secret: a command line is readable by every user of the machine (env or generated file)"}
# One valid environment value per field and the value it must give (a new field must be added here).
ENV_SAMPLES: dict[str, tuple[str, object]] = {
    "data_dir": ("/srv/fleet", Path("/srv/fleet")),
    "db_url": ("postgresql://fleet@db:5432/fleet", "postgresql://fleet@db:5432/fleet"),
    "mqtt_url": ("mqtt://broker:1883", "mqtt://broker:1883"),
    "embedded_mqtt_port": ("11883", 11883),
    "mqtt_client_id": ("fleet-eu-1", "fleet-eu-1"),
    "mqtt_persistent_session": ("false", False),
    "public_url": ("https://fleet.example/", "https://fleet.example"),
    "trusted_keys": (f"/k/a.pub{os.pathsep}/k/b.pub", [Path("/k/a.pub"), Path("/k/b.pub")]),
    "admin_token": ("adm_" + "x" * 24, "adm_" + "x" * 24),
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("9090", 9090),
    "max_bundle_bytes": ("1048576", 1048576),
    "controller_interval_s": ("0.25", 0.25),
    "drift_alert_threshold": ("0.4", 0.4),
    "alert_webhook_url": ("https://ml.example/retrain", "https://ml.example/retrain"),
    "alert_repeat_s": ("60", 60.0),
    "mqtt_ca": ("/etc/edgepack/ca.pem", Path("/etc/edgepack/ca.pem")),
    "mqtt_cert": ("/etc/edgepack/fleet-client.pem", Path("/etc/edgepack/fleet-client.pem")),
    "mqtt_key": ("/etc/edgepack/fleet-client.key", Path("/etc/edgepack/fleet-client.key")),
    "tls_cert": ("/etc/edgepack/fleet.pem", Path("/etc/edgepack/fleet.pem")),
    "tls_key": ("/etc/edgepack/fleet.key", Path("/etc/edgepack/fleet.key")),
    "mqtt_dynsec": ("true", True),
    "device_message_rate": ("5", 5.0),
    "device_message_burst": ("50", 50.0),
    "ingest_queue": ("1000", 1000),
    "ingest_batch": ("100", 100),
    "ingest_writers": ("3", 3),
    "mqtt_share_group": ("fleet-a", "fleet-a"),
    "telemetry_retention_days": ("7", 7.0),
    "rollup_retention_days": ("90", 90.0),
    "maintenance_interval_s": ("60", 60.0),
    "bundle_store": ("s3://bundles/fleet", "s3://bundles/fleet"),
    "s3_endpoint_url": ("http://minio.lab:9000", "http://minio.lab:9000"),
    "s3_region": ("eu-central-1", "eu-central-1"),
    "presign_expires_s": ("600", 600),
}


def _serve_command():
    return typer.main.get_command(server_app).commands["serve"]


def _plain(value: object) -> object:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def test_every_field_reads_its_own_environment_variable() -> None:
    assert set(ENV_SAMPLES) == set(FleetSettings.model_fields), "add the new field to ENV_SAMPLES"
    names = [FleetSettings.env_var(field) for field in FleetSettings.model_fields]
    assert all(name.startswith("EDGEPACK_") for name in names) and len(set(names)) == len(names)

    settings = FleetSettings.from_env({FleetSettings.env_var(f): raw for f, (raw, _) in ENV_SAMPLES.items()})

    assert {f: _plain(getattr(settings, f)) for f in ENV_SAMPLES} == {f: want for f, (_, want) in ENV_SAMPLES.items()}


def test_every_field_has_a_fleet_serve_option_named_after_it() -> None:
    options = {param.name: param for param in _serve_command().params if param.opts}

    missing = set(FleetSettings.model_fields) - set(options) - set(NO_OPTION)

    assert not missing, f"fleet serve lacks options for {sorted(missing)}"
    assert set(NO_OPTION) <= set(FleetSettings.model_fields) and not set(NO_OPTION) & set(options)
    # every option leaves the field to the environment unless given (default None), and is a real flag
    assert {name: options[name].default for name in FleetSettings.model_fields if name in options} == \
        {name: None for name in FleetSettings.model_fields if name in options}
    assert all(opt.startswith("--") for name in FleetSettings.model_fields if name in options for opt in options[name].opts)


def test_options_win_over_the_environment_and_the_environment_over_defaults() -> None:
    env = {"EDGEPACK_FLEET_HOST": "0.0.0.0", "EDGEPACK_CONTROLLER_INTERVAL_S": "5", "EDGEPACK_MQTT_PERSISTENT_SESSION": "0"}

    from_env = FleetSettings.from_env(env)
    overridden = FleetSettings.from_env(env, host="127.0.0.2", controller_interval_s=0.5, mqtt_persistent_session=None)

    assert (from_env.host, from_env.controller_interval_s, from_env.mqtt_persistent_session) == ("0.0.0.0", 5.0, False)
    assert (overridden.host, overridden.controller_interval_s, overridden.mqtt_persistent_session) == ("127.0.0.2", 0.5, False)
    defaults = FleetSettings.from_env({})
    assert (defaults.mqtt_persistent_session, defaults.mqtt_client_id, defaults.controller_interval_s) == (True, None, 1.0)


@pytest.mark.parametrize("field, raw", [("controller_interval_s", "0"), ("embedded_mqtt_port", "70000"),
                                        ("mqtt_client_id", ""), ("mqtt_persistent_session", "maybe")])
def test_values_out_of_range_are_refused(field: str, raw: str) -> None:
    with pytest.raises(ValueError, match=field):
        FleetSettings(**{field: raw})


def test_the_generated_mqtt_client_id_is_kept_in_the_data_folder(tmp_path: Path) -> None:
    first = resolve_mqtt_client_id(FleetSettings(data_dir=tmp_path / "a"))
    again = resolve_mqtt_client_id(FleetSettings(data_dir=tmp_path / "a"))
    other = resolve_mqtt_client_id(FleetSettings(data_dir=tmp_path / "b"))
    configured = resolve_mqtt_client_id(FleetSettings(data_dir=tmp_path / "a", mqtt_client_id="fleet-eu-1"))

    assert first == again and first.startswith("edgepack-fleet-")
    assert (tmp_path / "a" / "mqtt-client-id").read_text().strip() == first
    assert other != first and configured == "fleet-eu-1"


def test_the_fleet_reads_settings_as_attributes_only() -> None:
    """No `getattr(settings, "x", default)`: a setting that is not a field cannot be configured."""
    offenders = [f"{path.relative_to(REPO)}:{number}"
                 for path in sorted((REPO / "fleet").rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"getattr\(\s*(self\.)?_?settings\b", line)]

    assert offenders == []
