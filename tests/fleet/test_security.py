"""Who may call what, against a real uvicorn server on SQLite and PostgreSQL.

ROUTES is the access table of the API; a test fails when a route is added without a row here, so no
route can ship unprotected by accident.
"""

from __future__ import annotations

from pathlib import Path


from fleet.app import create_app
from fleet.settings import FleetSettings
from tests.fleet.conftest import BundleFactory, Fleet

VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"
DEVICE = "device"  # a device credential, for its own id only
READER = "viewer-or-device"  # a viewer token or any device credential
ENROLLMENT = "enrollment-token"  # the enrollment token in the body; no bearer token

ROUTES: list[tuple[str, str, str]] = [
    ("POST", "/api/v1/bundles", OPERATOR),
    ("GET", "/api/v1/bundles", VIEWER),
    ("GET", "/api/v1/bundles/{bundle_id}", VIEWER),
    ("GET", "/api/v1/bundles/{bundle_id}/telemetry", VIEWER),
    ("GET", "/api/v1/bundles/{bundle_id}/download", READER),
    ("HEAD", "/api/v1/bundles/{bundle_id}/download", READER),
    ("POST", "/api/v1/bundles/{bundle_id}/promote", OPERATOR),
    ("POST", "/api/v1/devices/enrollment-tokens", OPERATOR),
    ("POST", "/api/v1/devices/enroll", ENROLLMENT),
    ("GET", "/api/v1/devices", VIEWER),
    ("GET", "/api/v1/devices/{device_id}", VIEWER),
    ("POST", "/api/v1/devices/{device_id}/status", DEVICE),
    ("POST", "/api/v1/devices/{device_id}/revoke", OPERATOR),
    ("POST", "/api/v1/devices/{device_id}/rotate-credential", OPERATOR),
    ("POST", "/api/v1/rollouts", OPERATOR),
    ("GET", "/api/v1/rollouts", VIEWER),
    ("GET", "/api/v1/rollouts/{rollout_id}", VIEWER),
    ("POST", "/api/v1/rollouts/{rollout_id}/{action}", OPERATOR),
    ("GET", "/api/v1/alerts", VIEWER),
    ("POST", "/api/v1/tokens", ADMIN),
    ("GET", "/api/v1/tokens", ADMIN),
    ("POST", "/api/v1/tokens/{token_id}/revoke", ADMIN),
    ("GET", "/api/v1/audit", ADMIN),
]
ROLE_RANK = {VIEWER: 0, OPERATOR: 1, ADMIN: 2}
NO_SUCH_BUNDLE = "0" * 64


def _path(template: str, device_id: str = "no-such-device") -> str:
    return template.format(bundle_id=NO_SUCH_BUNDLE, device_id=device_id, rollout_id="no-such-rollout",
                           action="pause", token_id="999999")


def _call(client, method: str, path: str):
    body = {"json": {}} if method == "POST" else {}
    return client.request(method, path, **body)


def test_route_table_covers_every_api_route(tmp_path: Path) -> None:
    app = create_app(FleetSettings(data_dir=tmp_path))

    served = {(method.upper(), path) for path, operations in app.openapi()["paths"].items()
              if path.startswith("/api/") for method in operations}

    assert served == {(method, path) for method, path, _ in ROUTES}


def test_protected_routes_refuse_a_missing_or_unknown_token(fleet: Fleet) -> None:
    client = fleet.client()
    refused_wrongly = []
    for method, template, who in ROUTES:
        if who == ENROLLMENT:
            continue
        for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic YWRtaW46YWRtaW4="},
                        {"Authorization": "Bearer"}):
            response = client.request(method, _path(template), headers=headers,
                                      **({"json": {}} if method == "POST" else {}))
            if response.status_code != 401 or response.headers.get("www-authenticate") != "Bearer":
                refused_wrongly.append((method, template, headers, response.status_code, response.text))
    assert refused_wrongly == []


def test_routes_refuse_a_lower_role_and_admit_the_required_one(fleet: Fleet, unique: str) -> None:
    tokens = {role: fleet.token(role) for role in (VIEWER, OPERATOR, ADMIN)}
    device_credential = fleet.enroll(unique)
    device = fleet.client(device_credential)

    for method, template, who in ROUTES:
        if who == ENROLLMENT:
            continue
        path = _path(template)
        for role, token in tokens.items():
            response = _call(fleet.client(token), method, path)
            if who in ROLE_RANK:
                allowed = ROLE_RANK[role] >= ROLE_RANK[who]
            else:
                allowed = who == READER  # any viewer-or-better token reads; no token reports as a device
            if allowed:
                assert response.status_code not in (401, 403), (method, template, role, response.text)
            else:
                assert response.status_code == 403, (method, template, role, response.text)

        own_path = _path(template, device_id=unique)
        response = _call(device, method, own_path)
        if who in (READER, DEVICE):
            assert response.status_code not in (401, 403), (method, template, "device", response.text)
        else:
            assert response.status_code == 403, (method, template, "device", response.text)
            assert "device credential" in response.json()["detail"]


def test_device_credential_downloads_bundles_and_reports_only_for_its_own_id(
        fleet: Fleet, bundles: BundleFactory, unique: str) -> None:
    bundle_path = bundles.make(f"1.0.0-{unique}")
    bundle_id = fleet.upload(bundle_path).json()["id"]
    me, other = f"{unique}-a", f"{unique}-b"
    my_client = fleet.client(fleet.enroll(me))
    fleet.enroll(other)

    download = my_client.get(f"/api/v1/bundles/{bundle_id}/download")
    own = my_client.post(f"/api/v1/devices/{me}/status", json={"device_id": me, "phase": "active", "seq": 0})
    for_other = my_client.post(f"/api/v1/devices/{other}/status",
                               json={"device_id": other, "phase": "failed", "seq": 0})
    other_in_body = my_client.post(f"/api/v1/devices/{me}/status",
                                   json={"device_id": other, "phase": "failed", "seq": 0})

    assert download.status_code == 200 and download.content == bundle_path.read_bytes()
    assert own.status_code == 200, own.text
    assert for_other.status_code == 403 and other in for_other.json()["detail"]
    assert other_in_body.status_code == 403
    viewer = fleet.client(fleet.token(VIEWER))
    assert viewer.get(f"/api/v1/devices/{me}").json()["phase"] == "active"
    untouched = viewer.get(f"/api/v1/devices/{other}").json()
    assert untouched["phase"] == "idle" and untouched["last_status"] is None


def test_a_revoked_token_is_refused(fleet: Fleet) -> None:
    created = fleet.admin.post("/api/v1/tokens", json={"name": "short-lived", "role": "viewer"}).json()
    viewer = fleet.client(created["token"])
    assert viewer.get("/api/v1/bundles").status_code == 200

    revoked = fleet.admin.post(f"/api/v1/tokens/{created['id']}/revoke")

    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert viewer.get("/api/v1/bundles").status_code == 401
    listed = {t["id"]: t for t in fleet.admin.get("/api/v1/tokens").json()}
    assert listed[created["id"]]["revoked"] is True and "token" not in listed[created["id"]]


def test_tokens_are_stored_hashed_and_their_creation_audited(fleet: Fleet) -> None:
    from sqlalchemy import select

    from fleet.models import ApiToken

    created = fleet.admin.post("/api/v1/tokens", json={"name": "ci", "role": "operator"}).json()

    with fleet.app.state.session_factory() as session:
        stored = session.get(ApiToken, created["id"])
        assert stored.token_hash != created["token"] and len(stored.token_hash) == 64
        assert created["token"] not in {t.token_hash for t in session.scalars(select(ApiToken))}
    entries = fleet.admin.get("/api/v1/audit", params={"action": "token.create", "target": str(created["id"])}).json()
    assert entries[0]["details"] == {"name": "ci", "role": "operator", "scopes": None, "expires_at": None}
    assert entries[0]["actor"].startswith("token:admin")
