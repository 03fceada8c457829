"""Credential lifecycle over the real API (uvicorn, SQLite): revoke, rotate, re-enrollment, bound tokens."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def _token(fleet, **body) -> str:
    created = fleet.admin.post("/api/v1/devices/enrollment-tokens", json=body)
    assert created.status_code == 201, created.text
    return created.json()["token"]


def _enroll(fleet, device_id: str, token: str, profile: str = "rpi4", labels: dict | None = None):
    return fleet.client().post("/api/v1/devices/enroll", json={"device_id": device_id, "profile": profile,
                                                               "labels": labels or {}, "token": token})


def test_revoked_credential_is_refused_and_reenrollment_needs_a_newer_token(fleet) -> None:
    token = _token(fleet, uses=5)
    credential = _enroll(fleet, "cam-1", token).json()["credential"]
    assert fleet.client(credential).post("/api/v1/devices/cam-1/status", json={
        "schema_version": 1, "device_id": "cam-1"}).status_code == 200
    assert fleet.admin.post("/api/v1/devices/cam-1/revoke").status_code == 200
    assert fleet.client(credential).post("/api/v1/devices/cam-1/status", json={
        "schema_version": 1, "device_id": "cam-1"}).status_code == 401
    assert fleet.admin.post("/api/v1/devices/cam-1/revoke").status_code == 200  # again: idempotent
    assert fleet.admin.post("/api/v1/devices/cam-1/rotate-credential").status_code == 409

    old_token = _enroll(fleet, "cam-1", token)  # a token older than the revocation cannot bring it back
    assert old_token.status_code == 403 and "revoked" in old_token.json()["detail"]
    fresh = _enroll(fleet, "cam-1", _token(fleet))
    assert fresh.status_code == 201 and fresh.json()["reenrolled"]
    assert fleet.admin.get("/api/v1/devices/cam-1").json()["revoked_at"] is None


def test_rotation_replaces_the_credential(fleet) -> None:
    old = fleet.enroll("cam-2")
    rotated = fleet.admin.post("/api/v1/devices/cam-2/rotate-credential")
    assert rotated.status_code == 200
    new = rotated.json()["credential"]
    status = {"schema_version": 1, "device_id": "cam-2"}
    assert fleet.client(old).post("/api/v1/devices/cam-2/status", json=status).status_code == 401
    assert fleet.client(new).post("/api/v1/devices/cam-2/status", json=status).status_code == 200
    assert fleet.admin.post("/api/v1/devices/nobody/revoke").status_code == 404
    viewer = fleet.token("viewer")
    assert fleet.client(viewer).post("/api/v1/devices/cam-2/revoke").status_code == 403


def test_a_bound_token_fixes_the_profile_and_its_labels(fleet) -> None:
    token = _token(fleet, uses=1, profile="rpi4", labels={"site": "berlin"}, bind_labels=True)
    wrong_profile = _enroll(fleet, "cam-3", token, profile="rpi5")
    assert wrong_profile.status_code == 403 and "profile rpi4" in wrong_profile.json()["detail"]
    changed = _enroll(fleet, "cam-3", token, labels={"site": "paris"})
    assert changed.status_code == 403 and "site" in changed.json()["detail"]
    ok = _enroll(fleet, "cam-3", token, labels={"rack": "r1"})
    assert ok.status_code == 201 and ok.json()["labels"] == {"site": "berlin", "rack": "r1"}
    # the refusals gave their use back (one use, spent by the enrollment that passed)
    assert _enroll(fleet, "cam-4", token).status_code == 403


def test_the_fleet_identity_is_not_a_device_id(fleet) -> None:
    assert _enroll(fleet, "edgepack-fleet", _token(fleet)).status_code == 400
