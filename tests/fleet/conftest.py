"""Fleet test fixtures: real bundles, SQLite and PostgreSQL, and a real uvicorn server on loopback.

`db_url` is parametrized over both databases, so every test that takes it (directly or through
`fleet`) runs twice. PostgreSQL gets a fresh database per test module (`edgepack_test_<random>`,
dropped afterwards); tests in a module share it, so they name what they create uniquely (`unique`).
"""

from __future__ import annotations

import copy
import hashlib
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from edgepack.bundle import open_bundle, write_bundle
from edgepack.signing import generate_keypair, load_private_key, load_public_key
from fleet.app import create_app
from fleet.settings import FleetSettings

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------
# keys and bundles


@dataclass(frozen=True)
class Keys:
    trusted_private: Path
    trusted_public: Path
    untrusted_private: Path
    untrusted_public: Path


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> Keys:
    trusted = generate_keypair(tmp_path_factory.mktemp("trusted-key"))
    untrusted = generate_keypair(tmp_path_factory.mktemp("untrusted-key"))
    return Keys(trusted[0], trusted[1], untrusted[0], untrusted[1])


@pytest.fixture(scope="session")
def built_bundle(tmp_path_factory, keys: Keys) -> Path:
    """examples/digits built for rpi4 and signed with the trusted key, once per session."""
    from builder.pipeline import BuildRequest, run_build

    out = tmp_path_factory.mktemp("built")
    result = run_build(BuildRequest(config_path=REPO / "examples/digits/edgepack.yaml", profile="rpi4",
                                    out_dir=out, signing_key=keys.trusted_private, cache_dir=out / "cache"))
    assert result.exit_code == 0, result.report
    return next(path for path in result.outputs if path.name.endswith(".edgepack"))


@dataclass
class BundleFactory:
    """Real bundles derived from the built one: same members, a version of our choosing, re-signed."""

    source: Path
    keys: Keys
    out: Path
    _members: dict[str, bytes] = field(default_factory=dict)
    _manifest: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        verified = open_bundle(self.source, [load_public_key(self.keys.trusted_public)])
        self._members = {name: verified.read(name) for name in verified.members}
        self._manifest = verified.manifest.content.to_json_dict()

    def make(self, version: str, *, signed_by: Path | None = None, profile: str | None = None) -> Path:
        manifest = copy.deepcopy(self._manifest)
        manifest["version"] = version
        if profile:
            manifest["profile"] = profile
        key = load_private_key(signed_by or self.keys.trusted_private)
        path = self.out / f"{manifest['name']}-{version}-{manifest['profile']}.edgepack"
        write_bundle(path, self._members, manifest, key)
        return path


@pytest.fixture(scope="session")
def bundles(built_bundle: Path, keys: Keys, tmp_path_factory) -> BundleFactory:
    return BundleFactory(built_bundle, keys, tmp_path_factory.mktemp("bundles"))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def unique(request) -> str:
    """A name unique to this test (and its parameters), usable as a device id or version suffix."""
    base = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[-40:].strip("-")
    return f"{base}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------------------------------------------
# databases


@pytest.fixture(scope="module")
def postgres_module_url(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this test module, dropped when the module is done.

    `postgres_url` (tests/conftest.py) is EDGEPACK_TEST_POSTGRES_URL or the session's throwaway server;
    the database it names is only the one we connect to for CREATE/DROP DATABASE.
    """
    from tests.support import fresh_database

    with fresh_database(postgres_url) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return request.getfixturevalue("postgres_module_url")


@pytest.fixture
def migrated_factory(db_url: str):
    """A session factory on `db_url` migrated to the newest schema, every table empty (the PostgreSQL
    database is the module's, so earlier tests' rows are cleared first)."""
    from fleet.db import make_engine, make_session_factory, migrate
    from fleet.models import Base

    engine = make_engine(db_url)
    migrate(engine)
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
    yield make_session_factory(engine)
    engine.dispose()


# ---------------------------------------------------------------------------------------------------
# a real server


@contextmanager
def serve(app: FastAPI, timeout_s: float = 30.0) -> Iterator[str]:
    """Run `app` under uvicorn in a thread on a free loopback port; yields its base URL once /healthz answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this; without it a socket handed to uvicorn answers each request
    # ~40 ms late (Nagle's algorithm meeting delayed ACKs on loopback).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if not thread.is_alive():
                raise RuntimeError("the fleet server stopped during startup (see the log above)")
            try:
                if server.started and httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the fleet server did not answer /healthz within {timeout_s}s")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@dataclass
class Fleet:
    """A running fleet server and what a test needs to talk to it."""

    url: str
    app: FastAPI
    settings: FleetSettings
    admin_token: str
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def store_root(self) -> Path:
        return self.settings.store_dir

    def client(self, token: str | None = None) -> httpx.Client:
        """An HTTP client sending `token` as its bearer token (one per token, reused)."""
        for client in self.clients:
            if client.headers.get("authorization") == (f"Bearer {token}" if token else None):
                return client
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self.clients.append(client)
        return client

    @property
    def admin(self) -> httpx.Client:
        return self.client(self.admin_token)

    def token(self, role: str, name: str | None = None) -> str:
        response = self.admin.post("/api/v1/tokens", json={"name": name or f"{role}-{secrets.token_hex(3)}",
                                                           "role": role})
        assert response.status_code == 201, response.text
        return response.json()["token"]

    def upload(self, path: Path, token: str | None = None) -> httpx.Response:
        return self.client(token or self.admin_token).post(
            "/api/v1/bundles", content=path.read_bytes(), headers={"Content-Type": "application/octet-stream"})

    def enroll(self, device_id: str, *, profile: str = "rpi4", labels: dict | None = None,
               token_labels: dict | None = None) -> str:
        created = self.admin.post("/api/v1/devices/enrollment-tokens", json={"labels": token_labels or {}})
        assert created.status_code == 201, created.text
        response = self.client().post("/api/v1/devices/enroll", json={
            "device_id": device_id, "profile": profile, "labels": labels or {}, "token": created.json()["token"]})
        assert response.status_code == 201, response.text
        return response.json()["credential"]

    def store_files(self) -> list[Path]:
        root = self.store_root
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


StartFleet = Callable[..., Fleet]


@pytest.fixture
def start_fleet(db_url: str, tmp_path: Path, keys: Keys) -> Iterator[StartFleet]:
    """Start a fleet server on `db_url` (settings may be overridden); all are stopped after the test."""
    stack: list = []

    def start(**overrides) -> Fleet:
        admin_token = "adm_" + secrets.token_urlsafe(24)
        values = dict(data_dir=tmp_path / f"fleet-{len(stack)}", db_url=db_url, trusted_keys=[keys.trusted_public],
                      admin_token=admin_token)
        values.update(overrides)
        settings = FleetSettings(**values)
        app = create_app(settings)
        context = serve(app)
        url = context.__enter__()
        fleet = Fleet(url=url, app=app, settings=settings, admin_token=admin_token)
        stack.append((context, fleet))
        return fleet

    yield start
    for context, fleet in reversed(stack):
        for client in fleet.clients:
            client.close()
        context.__exit__(None, None, None)


@pytest.fixture
def fleet(start_fleet: StartFleet) -> Fleet:
    return start_fleet()
