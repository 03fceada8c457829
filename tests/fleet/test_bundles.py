"""Bundle upload, verification, listing, promotion and ranged download against a real server."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from fleet.models import Bundle
from tests.edgepack.samples import resign_with_manifest
from tests.fleet.conftest import BundleFactory, Fleet, StartFleet, sha256_of

RAW = {"Content-Type": "application/octet-stream"}


def _row_exists(fleet: Fleet, bundle_id: str) -> bool:
    with fleet.app.state.session_factory() as session:
        return session.get(Bundle, bundle_id) is not None


def _flip_model_byte(source: Path, target: Path) -> str:
    """Copy the bundle with one byte of its model file changed (the signature stays valid); returns the
    member's name."""
    with tarfile.open(source) as tar:
        member = next(m for m in tar.getmembers() if m.isfile() and m.name.startswith("model/"))
        offset = member.offset_data + member.size // 2
    data = bytearray(source.read_bytes())
    data[offset] ^= 0xFF
    target.write_bytes(bytes(data))
    return member.name


def test_upload_verifies_stores_and_records(fleet: Fleet, bundles: BundleFactory, unique: str) -> None:
    path = bundles.make(f"2.0.0-{unique}")
    digest = sha256_of(path)

    response = fleet.upload(path)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] == body["sha256"] == digest
    assert (body["name"], body["version"], body["profile"]) == ("digits-cnn", f"2.0.0-{unique}", "rpi4")
    assert body["size_bytes"] == path.stat().st_size and body["stage"] is None
    assert any(name.startswith("model/") for name in body["manifest"]["files"])
    assert body["download_url"] == f"/api/v1/bundles/{digest}/download"
    assert fleet.store_files() == [fleet.store_root / digest[:2] / digest]
    listed = fleet.admin.get("/api/v1/bundles", params={"name": "digits-cnn"}).json()
    assert digest in [b["id"] for b in listed]
    assert fleet.admin.get(f"/api/v1/bundles/{digest[:12]}").json()["id"] == digest  # a prefix finds it
    audit = fleet.admin.get("/api/v1/audit", params={"action": "bundle.upload", "target": digest}).json()
    assert audit[0]["details"]["version"] == f"2.0.0-{unique}"


def test_the_same_bundle_twice_and_by_multipart(fleet: Fleet, bundles: BundleFactory, unique: str) -> None:
    path = bundles.make(f"2.1.0-{unique}")

    first = fleet.admin.post("/api/v1/bundles", files={"bundle": (path.name, path.read_bytes())})
    again = fleet.upload(path)

    assert first.status_code == 201, first.text
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert len(fleet.store_files()) == 1


@pytest.mark.parametrize("problem", ["untrusted key", "tampered byte", "manifest lacks a field", "not a bundle", "empty",
                                     "no file field"])
def test_a_bundle_that_does_not_verify_is_refused_and_nothing_is_stored(
        fleet: Fleet, bundles: BundleFactory, keys, unique: str, tmp_path: Path, problem: str) -> None:
    good = bundles.make(f"3.0.0-{unique}")
    if problem == "untrusted key":
        path = bundles.make(f"3.0.1-{unique}", signed_by=keys.untrusted_private)
        response = fleet.upload(path)
        expected = ("SignatureError", "unknown key")
    elif problem == "tampered byte":
        path = tmp_path / "tampered.edgepack"
        member = _flip_model_byte(good, path)
        response = fleet.upload(path)
        expected = ("IntegrityError", f"{member}: sha256 mismatch")
    elif problem == "manifest lacks a field":
        path = tmp_path / "no-envelope.edgepack"
        resign_with_manifest(good, path, keys.trusted_private, lambda manifest: manifest.pop("envelope"))
        response = fleet.upload(path)
        expected = ("BundleError", "manifest.json: field 'envelope' is missing")
    elif problem == "not a bundle":
        path = tmp_path / "noise.edgepack"
        path.write_bytes(b"\x89PNG not a tar at all" * 100)
        response = fleet.upload(path)
        expected = ("BundleError", "not an edgepack bundle")
    elif problem == "empty":
        path = tmp_path / "empty.edgepack"
        path.write_bytes(b"")
        response = fleet.upload(path)
        expected = ("BundleError", "not an edgepack bundle")
    else:
        path = good
        response = fleet.admin.post("/api/v1/bundles", files={"model": (good.name, good.read_bytes())})
        expected = ("BundleError", "no file field named 'bundle'")

    assert response.status_code == 400, response.text
    assert response.json()["error"] == expected[0]
    assert expected[1] in response.json()["detail"]
    assert fleet.store_files() == []
    assert not _row_exists(fleet, sha256_of(path))
    assert fleet.admin.get(f"/api/v1/bundles/{sha256_of(path)}").status_code == 404


def test_an_upload_over_the_limit_is_refused(start_fleet: StartFleet, bundles: BundleFactory, unique: str) -> None:
    fleet = start_fleet(max_bundle_bytes=50_000)
    path = bundles.make(f"3.1.0-{unique}")

    raw = fleet.upload(path)
    streamed = fleet.admin.post("/api/v1/bundles", content=iter([path.read_bytes()]), headers=RAW)

    assert raw.status_code == 413 and streamed.status_code == 413, (raw.text, streamed.text)
    assert fleet.store_files() == []
    assert not _row_exists(fleet, sha256_of(path))


def test_promotion_moves_stages_and_is_audited(fleet: Fleet, bundles: BundleFactory, unique: str) -> None:
    bundle_id = fleet.upload(bundles.make(f"4.0.0-{unique}")).json()["id"]
    operator = fleet.client(fleet.token("operator", name=f"op-{unique}"))

    staged = operator.post(f"/api/v1/bundles/{bundle_id}/promote", json={"stage": "staging"})
    produced = operator.post(f"/api/v1/bundles/{bundle_id}/promote", json={"stage": "production"})
    unknown = operator.post(f"/api/v1/bundles/{bundle_id}/promote", json={"stage": "canary"})

    assert staged.json()["stage"] == "staging" and produced.json()["stage"] == "production"
    assert unknown.status_code == 422
    assert bundle_id in [b["id"] for b in fleet.admin.get("/api/v1/bundles", params={"stage": "production"}).json()]
    entries = fleet.admin.get("/api/v1/audit", params={"action": "bundle.promote", "target": bundle_id}).json()
    assert [(e["details"]["from"], e["details"]["to"]) for e in entries] == [("staging", "production"),
                                                                             (None, "staging")]
    assert {e["actor"] for e in entries} == {f"token:op-{unique}"}


# --- ranged downloads


@pytest.fixture
def stored(fleet: Fleet, bundles: BundleFactory, unique: str) -> tuple[str, bytes]:
    path = bundles.make(f"5.0.0-{unique}")
    response = fleet.upload(path)
    assert response.status_code == 201, response.text
    return response.json()["id"], path.read_bytes()


def test_an_interrupted_download_resumes_with_a_range(fleet: Fleet, stored: tuple[str, bytes]) -> None:
    bundle_id, data = stored
    client = fleet.client(fleet.token("viewer"))
    url = f"/api/v1/bundles/{bundle_id}/download"
    half = len(data) // 2

    first = client.get(url, headers={"Range": f"bytes=0-{half - 1}"})
    rest = client.get(url, headers={"Range": f"bytes={half}-", "If-Range": first.headers["etag"]})

    assert first.status_code == 206 and rest.status_code == 206
    assert first.headers["content-range"] == f"bytes 0-{half - 1}/{len(data)}"
    assert rest.headers["content-range"] == f"bytes {half}-{len(data) - 1}/{len(data)}"
    assert int(rest.headers["content-length"]) == len(data) - half
    assert first.content + rest.content == data
    assert hashlib.sha256(first.content + rest.content).hexdigest() == bundle_id


def test_a_download_stopped_mid_stream_resumes(fleet: Fleet, stored: tuple[str, bytes]) -> None:
    bundle_id, data = stored
    client = fleet.client(fleet.token("viewer"))
    url = f"/api/v1/bundles/{bundle_id}/download"
    received = b""
    with client.stream("GET", url) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes(chunk_size=4096):
            received += chunk
            if len(received) >= 10_000:
                break  # the connection drops here

    rest = client.get(url, headers={"Range": f"bytes={len(received)}-"})

    assert rest.status_code == 206
    assert received + rest.content == data


def test_full_download_headers_and_conditional_requests(fleet: Fleet, stored: tuple[str, bytes]) -> None:
    bundle_id, data = stored
    client = fleet.client(fleet.token("viewer"))
    url = f"/api/v1/bundles/{bundle_id}/download"

    full = client.get(url)
    head = client.head(url)
    suffix = client.get(url, headers={"Range": "bytes=-100"})
    several = client.get(url, headers={"Range": "bytes=0-1,5-6"})
    stale = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"another-version"'})
    cached = client.get(url, headers={"If-None-Match": f'"{bundle_id}"'})

    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{bundle_id}"'
    assert full.headers["accept-ranges"] == "bytes"
    assert int(full.headers["content-length"]) == len(data)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == len(data)
    assert suffix.status_code == 206 and suffix.content == data[-100:]
    assert several.status_code == 200 and several.content == data  # several ranges: the whole file
    assert stale.status_code == 200 and stale.content == data  # If-Range mismatch: the whole file
    assert cached.status_code == 304 and cached.content == b""


@pytest.mark.parametrize("range_header", ["bytes={size}-", "bytes={size}-{size_plus}", "bytes=-0"])
def test_an_unsatisfiable_range_is_416(fleet: Fleet, stored: tuple[str, bytes], range_header: str) -> None:
    bundle_id, data = stored
    header = range_header.format(size=len(data), size_plus=len(data) + 10)

    response = fleet.client(fleet.token("viewer")).get(f"/api/v1/bundles/{bundle_id}/download",
                                                       headers={"Range": header})

    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(data)}"


def test_downloading_an_unknown_bundle_is_404(fleet: Fleet) -> None:
    viewer = fleet.client(fleet.token("viewer"))
    assert viewer.get(f"/api/v1/bundles/{'1' * 64}/download").status_code == 404
    assert viewer.get("/api/v1/bundles/..%2f..%2fetc%2fpasswd/download").status_code == 404


def test_a_wave_of_concurrent_downloads_neither_exhausts_the_pool_nor_stalls_the_api(fleet: Fleet, stored: tuple[str, bytes]) -> None:
    """Far more downloads at once than the database pool has connections (5 + 10 on SQLite) and the server
    has worker threads (40): authentication and each stream give their connection back before the next
    step, so every download completes and the API keeps answering. (Holding them deadlocked the server:
    every thread waited for a connection, every connection belonged to a request waiting for a thread.)"""
    import threading

    import httpx

    bundle_id, data = stored
    token = fleet.token("viewer")
    url = f"{fleet.url}/api/v1/bundles/{bundle_id}/download"
    results: list[object] = []
    start = threading.Barrier(121)

    def download() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            start.wait()
            try:
                response = client.get(url)
                results.append((response.status_code, hashlib.sha256(response.content).hexdigest()))
            except httpx.HTTPError as exc:
                results.append(exc)

    threads = [threading.Thread(target=download) for _ in range(120)]
    for thread in threads:
        thread.start()
    start.wait()
    during = fleet.client(token).get("/api/v1/bundles")
    for thread in threads:
        thread.join(timeout=120)

    assert during.status_code == 200, during.text
    assert results.count((200, bundle_id)) == 120, [r for r in results if r != (200, bundle_id)][:3]
