"""Enrollment tokens, enrollment, credential rotation and device listing against a real server."""

from __future__ import annotations

import datetime as dt
import threading
import time

import httpx
import pytest

from tests.fleet.conftest import Fleet


def _token(fleet: Fleet, **body) -> str:
    response = fleet.admin.post("/api/v1/devices/enrollment-tokens", json=body)
    assert response.status_code == 201, response.text
    return response.json()["token"]


def _enroll(fleet: Fleet, device_id: str, token: str, profile: str = "rpi4", labels: dict | None = None):
    return fleet.client().post("/api/v1/devices/enroll", json={"device_id": device_id, "profile": profile,
                                                               "labels": labels or {}, "token": token})


def test_an_enrollment_token_is_single_use(fleet: Fleet, unique: str) -> None:
    token = _token(fleet)

    first = _enroll(fleet, f"{unique}-1", token)
    second = _enroll(fleet, f"{unique}-2", token)

    assert first.status_code == 201, first.text
    assert first.json()["credential"].startswith("epd_") and first.json()["reenrolled"] is False
    assert second.status_code == 403 and "used up" in second.json()["detail"]
    assert fleet.admin.get(f"/api/v1/devices/{unique}-2").status_code == 404


def _wait_past(expires_at: str) -> None:
    """Until the wall clock the server shares with this test has passed `expires_at` (an ISO time)."""
    deadline = dt.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    while dt.datetime.now(dt.timezone.utc) <= deadline:
        time.sleep(0.005)


def test_a_token_with_uses_and_one_that_expired(fleet: Fleet, unique: str) -> None:
    twice = _token(fleet, uses=2)
    created = fleet.admin.post("/api/v1/devices/enrollment-tokens", json={"ttl_s": 0.05})
    short = created.json()["token"]
    _wait_past(created.json()["expires_at"])

    results = [_enroll(fleet, f"{unique}-{i}", twice).status_code for i in range(3)]
    expired = _enroll(fleet, f"{unique}-late", short)
    unknown = _enroll(fleet, f"{unique}-x", "epe_made-up")

    assert results == [201, 201, 403]
    assert expired.status_code == 403 and "expired" in expired.json()["detail"]
    assert unknown.status_code == 401


def test_racing_devices_cannot_both_spend_the_last_use(fleet: Fleet, unique: str) -> None:
    token = _token(fleet)
    codes: list[int] = []

    def enroll(index: int) -> None:
        with httpx.Client(base_url=fleet.url, timeout=30) as client:
            codes.append(client.post("/api/v1/devices/enroll", json={
                "device_id": f"{unique}-r{index}", "profile": "rpi4", "token": token}).status_code)

    threads = [threading.Thread(target=enroll, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(codes) == [201] + [403] * 7


@pytest.mark.parametrize("bad_id", ["a/b", "dev+1", "dev#", "", "-leading", "x" * 129, "spaced id"])
def test_a_bad_device_id_is_refused_without_spending_the_token(fleet: Fleet, unique: str, bad_id: str) -> None:
    token = _token(fleet)

    refused = _enroll(fleet, bad_id, token)
    accepted = _enroll(fleet, unique, token)

    assert refused.status_code == 400 and refused.json()["error"] == "ProtocolError"
    assert accepted.status_code == 201


def test_labels_are_the_tokens_overlaid_by_the_devices(fleet: Fleet, unique: str) -> None:
    token = _token(fleet, labels={"site": "berlin", "tier": "canary"})

    response = _enroll(fleet, unique, token, profile="jetson-nano", labels={"tier": "edge", "rack": "r1"})

    assert response.status_code == 201
    assert response.json()["labels"] == {"site": "berlin", "tier": "edge", "rack": "r1"}
    device = fleet.admin.get(f"/api/v1/devices/{unique}").json()
    assert device["profile"] == "jetson-nano" and device["labels"]["tier"] == "edge"
    assert device["online"] is False and device["last_seen"] is None


def test_bad_labels_and_profiles_are_refused(fleet: Fleet, unique: str) -> None:
    token = _token(fleet)

    assert _enroll(fleet, unique, token, labels={"site": "a,b"}).status_code == 400
    assert _enroll(fleet, unique, token, profile="Not A Profile").status_code == 400
    assert fleet.admin.post("/api/v1/devices/enrollment-tokens", json={"labels": {"k": "v=w"}}).status_code == 400
    assert fleet.admin.post("/api/v1/devices/enrollment-tokens", json={"uses": 0}).status_code == 422


def test_reenrolling_needs_a_token_and_rotates_the_credential(fleet: Fleet, unique: str) -> None:
    old = _enroll(fleet, unique, _token(fleet)).json()["credential"]
    status_url = f"/api/v1/devices/{unique}/status"
    status = {"device_id": unique, "phase": "idle", "seq": 0}
    assert fleet.client(old).post(status_url, json=status).status_code == 200

    again = _enroll(fleet, unique, _token(fleet, labels={"site": "new"}), profile="rpi5")

    assert again.status_code == 201 and again.json()["reenrolled"] is True
    new = again.json()["credential"]
    assert new != old
    assert fleet.client(old).post(status_url, json=status).status_code == 401
    assert fleet.client(new).post(status_url, json=status).status_code == 200
    device = fleet.admin.get(f"/api/v1/devices/{unique}").json()
    assert device["profile"] == "rpi5" and device["labels"] == {"site": "new"}
    actions = [e["action"] for e in fleet.admin.get("/api/v1/audit", params={"target": unique}).json()]
    assert actions == ["device.reenroll", "device.enroll"]


def test_list_devices_by_selector_and_profile(fleet: Fleet, unique: str) -> None:
    run = unique[-6:]
    fleet.enroll(f"{unique}-a", profile="rpi4", labels={"run": run, "site": "a"})
    fleet.enroll(f"{unique}-b", profile="rpi5", labels={"run": run, "site": "a"})
    fleet.enroll(f"{unique}-c", profile="rpi4", labels={"run": run, "site": "b"})
    viewer = fleet.client(fleet.token("viewer"))

    def ids(**params) -> list[str]:
        response = viewer.get("/api/v1/devices", params=params)
        assert response.status_code == 200, response.text
        return [d["id"] for d in response.json()]

    assert ids(selector=f"run={run}") == [f"{unique}-a", f"{unique}-b", f"{unique}-c"]
    assert ids(selector=f"run={run},site=a") == [f"{unique}-a", f"{unique}-b"]
    assert ids(selector=f"run={run},site=a", profile="rpi4") == [f"{unique}-a"]
    assert ids(selector=f"run={run},site=zzz") == []
    assert viewer.get("/api/v1/devices", params={"selector": "no-equals-sign"}).status_code == 400
