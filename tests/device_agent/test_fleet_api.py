"""Enrollment retries through edgepack.retry: a fleet that is down and comes back is retried, a stop ends it."""

from __future__ import annotations

import json
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from device_agent.fleet_api import FleetClient, enroll_until_done
from edgepack.errors import ConfigError


class _FlakyFleet(ThreadingHTTPServer):
    """Answers the enroll route with 503 `failures` times, then with a credential (or a 401)."""

    def __init__(self, failures: int, refuse: bool = False) -> None:
        self.failures = failures
        self.refuse = refuse
        self.requests = 0
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _FlakyFleet

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests += 1
        if self.server.refuse:
            status, body = 401, {"detail": "invalid enrollment token"}
        elif self.server.requests <= self.server.failures:
            status, body = 503, {"detail": "starting"}
        else:
            status, body = 200, {"credential": "dc_test"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def flaky_fleet(request: pytest.FixtureRequest):
    fleet = _FlakyFleet(**getattr(request, "param", {"failures": 3}))
    thread = threading.Thread(target=fleet.serve_forever, daemon=True)
    thread.start()
    yield fleet
    fleet.shutdown()
    fleet.server_close()
    thread.join()


def _client(fleet: _FlakyFleet) -> FleetClient:
    host, port = fleet.server_address[:2]
    return FleetClient(f"http://{host}:{port}", "dev-retry", timeout_s=5)


def test_enrollment_is_retried_until_the_fleet_answers(flaky_fleet: _FlakyFleet) -> None:
    credential = enroll_until_done(_client(flaky_fleet), profile="rpi5", labels={}, token="et_x",
                                   should_stop=lambda: False, backoff_s=0.01, max_backoff_s=0.02, rng=random.Random(1))

    assert credential == "dc_test" and flaky_fleet.requests == 4


@pytest.mark.parametrize("flaky_fleet", [{"failures": 0, "refuse": True}], indirect=True)
def test_a_refusal_is_not_retried(flaky_fleet: _FlakyFleet) -> None:
    with pytest.raises(ConfigError, match="HTTP 401"):
        enroll_until_done(_client(flaky_fleet), profile="rpi5", labels={}, token="et_x",
                          should_stop=lambda: False, backoff_s=0.01)

    assert flaky_fleet.requests == 1


def test_stopping_while_the_fleet_is_unreachable_returns_none() -> None:
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]  # bound, never listening: every connect is refused
        attempts: list[int] = []
        client = FleetClient(f"http://127.0.0.1:{port}", "dev-retry", timeout_s=5)
        original = client.enroll

        def counting_enroll(**kwargs: object) -> str:
            attempts.append(1)
            return original(**kwargs)

        client.enroll = counting_enroll  # type: ignore[method-assign]

        credential = enroll_until_done(client, profile="rpi5", labels={}, token="et_x",
                                       should_stop=lambda: len(attempts) >= 3, backoff_s=0.01, max_backoff_s=0.02)

    assert credential is None and len(attempts) == 3
