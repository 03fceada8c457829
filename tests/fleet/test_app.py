"""The app around the routes: startup (migrations, admin token), lifespan hooks, /healthz, /metrics,
and the rollout routes wired to the rollout engine."""

from __future__ import annotations

import socket
import stat
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from edgepack.errors import ConfigError
from fleet.embedded_broker import EmbeddedBroker
from fleet.mqtt_bridge import check_broker
from testbeds.mosquitto import free_port

from fleet import metrics
from fleet.app import create_app, prepare
from fleet.db import make_engine
from fleet.settings import FleetSettings
from tests.fleet.conftest import BundleFactory, Fleet, StartFleet, serve


def test_first_start_creates_an_admin_token_file_and_a_restart_keeps_it(db_url: str, tmp_path: Path) -> None:
    settings = FleetSettings(data_dir=tmp_path / "data", db_url=db_url)
    engine = make_engine(db_url)
    try:
        token = prepare(settings, engine)
        again = prepare(settings, engine)
    finally:
        engine.dispose()

    assert token and token.startswith("ept_") and again is None
    token_file = tmp_path / "data" / "admin.token"
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    app = create_app(settings)
    with serve(app) as url:
        assert app.state.new_admin_token is None  # the CLI already printed it; startup does not make another
        response = httpx.get(f"{url}/api/v1/tokens", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert any(t["name"] == "admin (bootstrap)" and t["role"] == "admin" for t in response.json())


def test_the_environment_token_is_used_and_rotating_it_retires_the_old_one(db_url: str, tmp_path: Path) -> None:
    first = FleetSettings.from_env({"EDGEPACK_ADMIN_TOKEN": "first-admin-token-123456", "EDGEPACK_DB_URL": db_url,
                                    "EDGEPACK_FLEET_DATA_DIR": str(tmp_path / "data")})
    second = first.model_copy(update={"admin_token": FleetSettings(admin_token="second-admin-token-12345").admin_token})

    with serve(create_app(first)) as url:
        assert httpx.get(f"{url}/api/v1/audit", headers={"Authorization": "Bearer first-admin-token-123456"}).status_code == 200
    with serve(create_app(second)) as url:
        old = httpx.get(f"{url}/api/v1/audit", headers={"Authorization": "Bearer first-admin-token-123456"})
        new = httpx.get(f"{url}/api/v1/audit", headers={"Authorization": "Bearer second-admin-token-12345"})

    assert old.status_code == 401 and new.status_code == 200
    assert not (tmp_path / "data" / "admin.token").exists()


def test_lifespan_hooks_run_after_migrations_and_leave_in_reverse(db_url: str, tmp_path: Path) -> None:
    events: list[str] = []

    def hook(name: str):
        @asynccontextmanager
        async def attach(app):
            with app.state.session_factory() as session:  # the schema is there when hooks start
                session.execute(text("SELECT count(*) FROM rollouts"))
            events.append(f"enter {name}")
            yield
            events.append(f"exit {name}")
        return attach

    app = create_app(FleetSettings(data_dir=tmp_path, db_url=db_url, admin_token="t" * 20),
                     lifespan_hooks=[hook("controller"), hook("bridge")])
    with serve(app):
        assert events == ["enter controller", "enter bridge"]
    assert events == ["enter controller", "enter bridge", "exit bridge", "exit controller"]


def test_healthz_and_metrics(fleet: Fleet) -> None:
    client = fleet.client()
    fleet.admin.get("/api/v1/bundles")
    client.get("/api/v1/bundles")  # 401
    metrics.MQTT_MALFORMED.inc()

    health = client.get("/healthz")
    exposition = client.get("/metrics")

    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert exposition.status_code == 200 and exposition.headers["content-type"].startswith("text/plain")
    text = exposition.text
    assert 'edgepack_http_requests_total{method="GET",route="/api/v1/bundles",status="200"}' in text
    assert 'edgepack_http_requests_total{method="GET",route="/api/v1/bundles",status="401"}' in text
    assert "edgepack_mqtt_malformed_messages_total" in text
    assert "edgepack_bundles_uploaded_total" in text and "edgepack_enrollments_total" in text
    assert "# TYPE edgepack_devices gauge" in text


def test_healthz_reports_an_unreachable_database(start_fleet: StartFleet) -> None:
    fleet = start_fleet()
    unreachable = make_engine("sqlite:////nonexistent-dir/x.db")
    fleet.app.state.session_factory.configure(bind=unreachable)
    try:
        response = fleet.client().get("/healthz")
    finally:
        unreachable.dispose()

    assert response.status_code == 503 and response.json()["status"] == "error"


def test_rollout_routes_call_the_rollout_engine(fleet: Fleet, bundles: BundleFactory, unique: str) -> None:
    bundle_id = fleet.upload(bundles.make(f"6.0.0-{unique}")).json()["id"]
    fleet.enroll(f"{unique}-a", profile="rpi4", labels={"run": unique[-6:]})
    operator = fleet.client(fleet.token("operator"))

    created = operator.post("/api/v1/rollouts", json={"bundle_id": bundle_id[:16], "selector": f"run={unique[-6:]}",
                                                      "waves": [50, 100], "bake_s": 0})
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]
    paused = operator.post(f"/api/v1/rollouts/{rollout_id}/pause")
    listed = operator.get("/api/v1/rollouts")
    missing = operator.get("/api/v1/rollouts/no-such-rollout")
    no_bundle = operator.post("/api/v1/rollouts", json={"bundle_id": "f" * 64})
    bad_action = operator.post(f"/api/v1/rollouts/{rollout_id}/explode")

    assert paused.status_code == 200, paused.text
    assert rollout_id in [r["id"] for r in listed.json()]
    assert missing.status_code == 404 and no_bundle.status_code == 404 and bad_action.status_code == 422


# ---------------------------------------------------------------------------------------------------
# startup checks: one ConfigError naming what is wrong, before anything starts


def test_an_unreachable_database_is_one_line_naming_the_url_without_its_password(tmp_path: Path) -> None:
    url = f"postgresql://fleet:s3cret-pw@127.0.0.1:{free_port()}/fleet"  # nothing listens there
    engine = make_engine(url)
    try:
        with pytest.raises(ConfigError) as refused:
            prepare(FleetSettings(data_dir=tmp_path / "data", db_url=url), engine)
    finally:
        engine.dispose()

    message = refused.value.message
    assert message.startswith("database postgresql+psycopg://fleet:***@127.0.0.1:") and "unreachable" in message
    assert "s3cret-pw" not in message and "\n" not in message
    assert not (tmp_path / "data" / "admin.token").exists()  # nothing was half-prepared


def test_an_unreachable_broker_is_one_line_naming_the_url_without_its_password() -> None:
    with pytest.raises(ConfigError) as refused:
        check_broker(f"mqtt://fleet:s3cret-pw@127.0.0.1:{free_port()}", timeout_s=5)

    message = refused.value.message
    assert message.startswith("MQTT broker mqtt://fleet:***@127.0.0.1:") and "unreachable" in message
    assert "s3cret-pw" not in message


def test_a_reachable_broker_passes_the_check(mosquitto) -> None:
    check_broker(mosquitto.url)


def test_the_embedded_broker_on_a_taken_port_is_one_line_naming_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"embedded MQTT broker port {port} on 127.0.0.1 is already in use"):
            EmbeddedBroker(port=port).start()
