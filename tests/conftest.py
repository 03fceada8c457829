"""Shared fixtures: every test gets its own cache and config folders, never the user's."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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


@pytest.fixture
def postgres_url():
    """EDGEPACK_TEST_POSTGRES_URL (CI sets it); tests that need PostgreSQL fail loudly without it."""
    url = os.environ.get("EDGEPACK_TEST_POSTGRES_URL")
    if not url:
        raise RuntimeError("set EDGEPACK_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/test (`.ci/run` does)")
    return url
