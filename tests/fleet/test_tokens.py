"""API tokens that are scoped and expire, against a real uvicorn server on SQLite and PostgreSQL, and the
`edgepack tokens` commands that make them."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time

from typer.testing import CliRunner

from edgepack.cli import app
from fleet.auth import SCOPES
from tests.fleet.conftest import Fleet


def _create(fleet: Fleet, **body) -> dict:
    response = fleet.admin.post("/api/v1/tokens", json={"name": "t", "role": "operator", **body})
    assert response.status_code == 201, response.text
    return response.json()


def test_a_scoped_token_may_call_only_its_route_groups(fleet: Fleet) -> None:
    created = _create(fleet, scopes=["rollouts:read", "rollouts:write", "rollouts:read"])
    client = fleet.client(created["token"])

    rollouts = client.get("/api/v1/rollouts")
    bundles = client.get("/api/v1/bundles")
    enrollment = client.post("/api/v1/devices/enrollment-tokens", json={})

    assert created["scopes"] == ["rollouts:read", "rollouts:write"] and created["expires_at"] is None
    assert rollouts.status_code == 200
    assert bundles.status_code == 403 and "bundles:read scope" in bundles.json()["detail"]
    assert enrollment.status_code == 403 and "devices:write scope" in enrollment.json()["detail"]


def test_a_scope_never_widens_the_role(fleet: Fleet) -> None:
    viewer = fleet.admin.post("/api/v1/tokens", json={"name": "v", "role": "viewer", "scopes": ["rollouts:write"]})
    operator = fleet.admin.post("/api/v1/tokens", json={"name": "o", "role": "operator", "scopes": ["tokens:write"]})
    unknown = fleet.admin.post("/api/v1/tokens", json={"name": "u", "role": "admin", "scopes": ["everything"]})

    assert viewer.status_code == 400 and "needs the operator role" in viewer.json()["detail"]
    assert operator.status_code == 400 and "needs the admin role" in operator.json()["detail"]
    assert unknown.status_code == 422


def test_an_unscoped_token_may_do_all_its_role_allows(fleet: Fleet) -> None:
    created = _create(fleet, role="viewer")
    client = fleet.client(created["token"])

    reads = [client.get(path).status_code for path in ("/api/v1/bundles", "/api/v1/devices", "/api/v1/rollouts",
                                                        "/api/v1/alerts")]
    write = client.post("/api/v1/devices/enrollment-tokens", json={})

    assert created["scopes"] is None
    assert reads == [200, 200, 200, 200]
    assert write.status_code == 403 and "operator role" in write.json()["detail"]


def test_an_expired_token_gets_a_401_saying_when_it_expired(fleet: Fleet) -> None:
    created = _create(fleet, role="viewer", ttl_s=1.0)
    client = fleet.client(created["token"])
    expires_at = dt.datetime.fromisoformat(created["expires_at"])
    before = client.get("/api/v1/bundles")

    while dt.datetime.now(dt.timezone.utc) <= expires_at:  # until the token's own expiry has passed
        time.sleep(0.05)
    after = client.get("/api/v1/bundles")

    assert before.status_code == 200
    assert after.status_code == 401 and after.headers["www-authenticate"] == "Bearer"
    assert after.json()["detail"].startswith(f"this API token expired at {expires_at.isoformat()}")
    listed = {row["id"]: row for row in fleet.admin.get("/api/v1/tokens").json()}
    assert dt.datetime.fromisoformat(listed[created["id"]]["expires_at"]) == expires_at


def test_a_token_cannot_revoke_itself_but_another_admin_can(fleet: Fleet) -> None:
    second = _create(fleet, role="admin")
    second_client = fleet.client(second["token"])

    itself = second_client.post(f"/api/v1/tokens/{second['id']}/revoke")
    by_the_other = fleet.admin.post(f"/api/v1/tokens/{second['id']}/revoke")
    afterwards = second_client.get("/api/v1/tokens")

    assert itself.status_code == 409 and "cannot revoke itself" in itself.json()["detail"]
    assert by_the_other.status_code == 200 and by_the_other.json()["revoked"] is True
    assert afterwards.status_code == 401


def test_token_creation_with_scopes_and_expiry_is_audited(fleet: Fleet) -> None:
    created = _create(fleet, scopes=["devices:read"], ttl_s=3600)

    entries = fleet.admin.get("/api/v1/audit", params={"action": "token.create", "target": str(created["id"])}).json()

    assert entries[0]["details"] == {"name": "t", "role": "operator", "scopes": ["devices:read"],
                                     "expires_at": created["expires_at"].replace("Z", "+00:00")}


def test_scopes_cover_every_route_group() -> None:
    groups = {scope.split(":")[0] for scope in SCOPES}

    assert groups == {"bundles", "devices", "rollouts", "alerts", "tokens", "audit"}


def test_the_tokens_commands_create_list_and_revoke(fleet: Fleet) -> None:
    runner = CliRunner()
    common = ["--fleet-url", fleet.url, "--token", fleet.admin_token]

    created = runner.invoke(app, ["tokens", "create", "--name", "ci", "--role", "operator", "--scope", "rollouts:read",
                                  "--scope", "rollouts:write", "--ttl", "3600", "--json", *common])
    token = json.loads(created.output)
    works = fleet.client(token["token"]).get("/api/v1/rollouts")
    listed = runner.invoke(app, ["tokens", "list", "--json", *common])
    refused = subprocess.run([sys.executable, "-m", "edgepack", "tokens", "create", "--name", "x", "--role", "viewer",
                              "--scope", "rollouts:write", *common], capture_output=True, text=True, timeout=120)
    revoked = runner.invoke(app, ["tokens", "revoke", str(token["id"]), *common])

    assert created.exit_code == 0, created.output
    assert token["scopes"] == ["rollouts:read", "rollouts:write"] and token["expires_at"] is not None
    assert works.status_code == 200
    assert token["id"] in [row["id"] for row in json.loads(listed.output)]
    assert refused.returncode == 2 and "needs the operator role" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert revoked.exit_code == 0 and f"revoked token {token['id']} (ci)" in revoked.output
    assert fleet.client(token["token"]).get("/api/v1/rollouts").status_code == 401  # revoked at once
