"""`edgepack fleet serve` that cannot start says why in one line, exit 2, as a real process.

The obstacles are real: a socket that listens on the HTTP or broker port, and for an unreachable
broker or database a port held by a bound socket that does not listen (connections are refused, and
no other process can take the port while the test runs).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ANY_PORT = ("127.0.0.1", 0)


def serve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("EDGEPACK_")}
    env.update(COLUMNS="200", NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "edgepack", "fleet", "serve", "--data-dir", "fleet-data", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines of stderr that are not the server's progress notes (log lines and the startup banner)."""
    return [line for line in result.stderr.splitlines() if line.startswith(("error:", "internal error:", "Traceback"))]


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something already listens on."""
    with socket.create_server(ANY_PORT) as taken:
        yield taken.getsockname()[1]


@pytest.fixture
def refusing() -> Iterator[int]:
    """A port nothing listens on (connections are refused), held so no other process takes it meanwhile."""
    with socket.socket() as held:
        held.bind(ANY_PORT)
        yield held.getsockname()[1]


def test_a_taken_http_port_is_one_line_naming_it_before_anything_starts(tmp_path, listening, refusing):
    result = serve("--port", str(listening), "--embedded-mqtt-port", str(refusing), cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: HTTP port {listening} on 127.0.0.1 is already in use (choose another with --port)"]
    assert not (tmp_path / "fleet-data").exists()


def test_a_taken_embedded_broker_port_is_one_line_naming_it(tmp_path, listening):
    result = serve("--port", "0", "--embedded-mqtt-port", str(listening), cwd=tmp_path)

    assert result.returncode == 2
    assert error_lines(result) == [f"error: embedded MQTT broker port {listening} on 127.0.0.1 is already in use "
                                   "(choose another with --embedded-mqtt-port, or use a broker with --mqtt-url)"]
    assert not (tmp_path / "fleet-data").exists()


def test_an_unreachable_broker_is_one_line_naming_it_without_its_password(tmp_path, refusing):
    result = serve("--port", "0", "--mqtt-url", f"mqtt://fleet:s3cret-pw@127.0.0.1:{refusing}", cwd=tmp_path)

    assert result.returncode == 2
    assert error_lines(result) == [f"error: MQTT broker mqtt://fleet:***@127.0.0.1:{refusing} is unreachable: "
                                   "Connection refused (check --mqtt-url)"]
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert not (tmp_path / "fleet-data").exists()


def test_an_unreachable_database_is_one_line_naming_it_without_its_password(tmp_path, refusing, mosquitto):
    # A real broker, so the database is the one thing that cannot be reached.
    url = f"postgresql://fleet:s3cret-pw@127.0.0.1:{refusing}/fleet"
    result = serve("--port", "0", "--db-url", url, "--mqtt-url", mosquitto.url, cwd=tmp_path)

    assert result.returncode == 2
    [line] = error_lines(result)
    assert line.startswith(f"error: database postgresql+psycopg://fleet:***@127.0.0.1:{refusing}/fleet is unreachable: ")
    assert line.endswith("Connection refused (check --db-url)")
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_an_option_out_of_range_is_one_line_naming_the_setting(tmp_path):
    result = serve("--port", "70000", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: fleet settings: field 'port': Input should be less than or equal to 65535 (got 70000)"]
