"""Helpers for tests (importable as `tests.support`)."""

from __future__ import annotations

import os
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run `python -m edgepack ARGS` as a real process; returns CompletedProcess with text output."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgepack", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=900)


@contextmanager
def fresh_database(server_url: str, prefix: str = "edgepack_test") -> Iterator[str]:
    """A new, empty PostgreSQL database on the server `server_url` names (that database is only the one we
    connect to for CREATE/DROP DATABASE); its URL, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin_url = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
