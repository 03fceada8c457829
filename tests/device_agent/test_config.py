"""agent.yaml: validated up front, one-line errors naming the field."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from device_agent.config import AgentConfig
from device_agent.cli import app
from edgepack.errors import ConfigError

GOOD = {
    "device_id": "cam-017", "profile": "rpi4", "fleet_url": "http://fleet.local:8000/", "mqtt_url": "mqtt://fleet.local:1883",
    "enrollment_token": "et_abc", "state_dir": "state", "trusted_keys": ["keys/edgepack.pub"],
    "labels": {"site": "lab", "line": 3}, "serve": {"host": "127.0.0.1", "port": 8700},
    "download": {"chunk_bytes": 65536, "retries": 3, "backoff_s": 0.5}, "selftest_timeout_s": 20,
}


def _write(tmp_path, data) -> object:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return path


def test_a_good_config_loads_with_paths_relative_to_its_folder(tmp_path):
    config = AgentConfig.from_yaml(_write(tmp_path, GOOD))

    assert config.state_dir == tmp_path / "state"
    assert config.trusted_keys == [tmp_path / "keys" / "edgepack.pub"]
    assert config.fleet_url == "http://fleet.local:8000"
    assert config.labels == {"site": "lab", "line": "3"}
    assert (config.download.chunk_bytes, config.download.retries, config.selftest_timeout_s) == (65536, 3, 20)


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"device_id": "a/b"}, "field 'device_id': invalid device id 'a/b'"),
    ({"mqtt_url": "http://x"}, "field 'mqtt_url': must be an mqtt:// or mqtts:// URL"),
    ({"fleet_url": "fleet.local"}, "field 'fleet_url': must be an http:// or https:// URL"),
    ({"download": {"retries": -1}}, "field 'download.retries': Input should be greater than or equal to 0"),
    ({"trusted_keys": []}, "field 'trusted_keys': List should have at least 1 item"),
    ({"serve": {"port": 70000}}, "field 'serve.port': Input should be less than or equal to 65535"),
])
def test_a_bad_value_is_one_line_naming_the_field(tmp_path, change, message):
    with pytest.raises(ConfigError) as caught:
        AgentConfig.from_yaml(_write(tmp_path, {**GOOD, **change}))

    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_missing_and_unparsable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="agent config .* does not exist"):
        AgentConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        AgentConfig.from_yaml(_write(tmp_path, "device_id: [unclosed\n"))


def test_agent_status_prints_the_state_folder_as_json(tmp_path):
    path = _write(tmp_path, GOOD)

    result = CliRunner().invoke(app, ["status", "--config", str(path), "--json"])

    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert document["device_id"] == "cam-017"
    assert document["pointer"]["active"] is None and document["journal"]["last_seq"] == -1


def test_agent_run_refuses_a_bad_config_before_doing_anything(tmp_path):
    path = _write(tmp_path, {**GOOD, "device_id": "a+b"})

    result = CliRunner().invoke(app, ["run", "--config", str(path)])

    assert isinstance(result.exception, ConfigError)
    assert not (tmp_path / "state").exists()
