"""Shared fixtures and the test markers.

Every test gets its own cache and config folders, never the user's. Markers are given here, by rule, so
nobody has to remember them: a test is `e2e` when it lives in tests/e2e/ or needs a service running beside
it (a Mosquitto broker, a PostgreSQL server, a fleet server, an agent: the fixtures in E2E_FIXTURES, or a
`db_url` parametrized to PostgreSQL); every other test is `unit` (real libraries and files in this process,
SQLite included). `make test-fast` runs `-m "not e2e"`. A skipped test fails the run: the suite promises
that everything it holds ran.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ENV = "EDGEPACK_TEST_POSTGRES_URL"
TESTS = Path(__file__).resolve().parent
# Fixtures that start a service process or server for the test (directly or through `fleet`).
E2E_FIXTURES = frozenset({"mosquitto", "postgres_url", "start_fleet", "run_agent", "s3_server"})
_SKIPPED: list[str] = []


def _is_e2e(item: pytest.Item) -> bool:
    if TESTS / "e2e" in item.path.resolve().parents:
        return True
    if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    # `db_url` reaches PostgreSQL through request.getfixturevalue, which the fixture closure cannot see.
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("db_url") == "postgresql"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not (item.get_closest_marker("e2e") or item.get_closest_marker("unit")):
            item.add_marker(pytest.mark.e2e if _is_e2e(item) else pytest.mark.unit)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SKIPPED and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _SKIPPED:
        terminalreporter.write_line(f"{len(_SKIPPED)} test(s) skipped, which this suite does not allow "
                                    f"(the run fails): {', '.join(_SKIPPED[:5])}", red=True)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("EDGEPACK_CACHE_DIR", str(home / "cache" / "edgepack"))
    monkeypatch.delenv("EDGEPACK_SIGNING_KEY", raising=False)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    yield


@pytest.fixture
def mosquitto():
    """A private Mosquitto broker on a free loopback port, stopped after the test."""
    from testbeds.mosquitto import MosquittoBroker

    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (s3rver, testbeds/s3.py) on a free loopback port for the session."""
    from testbeds.s3 import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for the session: EDGEPACK_TEST_POSTGRES_URL if set, else a throwaway one.

    The throwaway server (testbeds/postgres.py) starts on first use, on a free loopback port, and is
    stopped and deleted when the session ends, after failures and Ctrl-C too (an atexit hook covers an
    interpreter that exits without running the teardown).
    """
    url = os.environ.get(PG_ENV)
    if url:
        yield url
        return
    from testbeds.postgres import PostgresServer

    with PostgresServer() as server:
        yield server.url
