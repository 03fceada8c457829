"""S3BundleStore against a real S3-compatible server (s3rver over HTTP on loopback, testbeds/s3.py):
objects under their sha256, duplicates stored once, presigned URLs that serve Range and expire, clear
errors for a wrong key or an unknown bucket."""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgepack.errors import ConfigError, NotFound, StoreUnavailable
from fleet.settings import FleetSettings
from fleet.store import BundleStore, FileBundleStore, S3BundleStore, store_for


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def _store(s3_server, tmp_path: Path, prefix: str, **kwargs) -> S3BundleStore:
    return S3BundleStore(f"s3://{s3_server.bucket}/{prefix}", staging_dir=tmp_path / "staging",
                         endpoint_url=s3_server.endpoint_url, **kwargs)


def _object_keys(store: S3BundleStore) -> list[str]:
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix + "/")
    return sorted(item["Key"] for item in listed.get("Contents", []))


def test_put_keeps_bytes_under_their_sha256_and_a_duplicate_is_one_object(s3_env, tmp_path: Path) -> None:
    store = _store(s3_env, tmp_path, "put")
    store.check()
    payload = b"bundle bytes " * 5000
    digest = hashlib.sha256(payload).hexdigest()
    first, second = store.new_upload(), store.new_upload()
    first.write_bytes(payload)
    second.write_bytes(payload)

    assert isinstance(store, BundleStore)
    assert store.put(first) == store.put(second) == digest

    assert _object_keys(store) == [f"put/{digest[:2]}/{digest}"]
    assert not first.exists() and not second.exists(), "staged uploads are removed once in the bucket"
    assert store.exists(digest) and store.size(digest) == len(payload)
    with store.open(digest) as handle:
        handle.seek(len(payload) - 5)
        assert handle.read() == payload[-5:]
    outside = tmp_path / "outside.bin"
    outside.write_bytes(payload)
    store.put(outside)
    assert outside.exists(), "a file from outside the staging folder is copied, not moved"

    store.delete(digest)
    assert not store.exists(digest) and _object_keys(store) == []
    with pytest.raises(NotFound):
        store.size(digest)
    with pytest.raises(NotFound):
        store.open(digest)


def test_presigned_urls_serve_ranges_are_reused_for_half_their_life_and_expire(s3_env, tmp_path: Path) -> None:
    clock = Clock()
    store = _store(s3_env, tmp_path, "presign", expires_s=2, clock=clock)
    upload = store.new_upload()
    payload = bytes(range(256)) * 40
    upload.write_bytes(payload)
    digest = store.put(upload)

    url = store.presign(digest)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=2" in url
    request = urllib.request.Request(url, headers={"Range": "bytes=1000-"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-{len(payload) - 1}/{len(payload)}"
        assert response.read() == payload[1000:]
    clock.now += 0.5
    assert store.presign(digest) == url, "more than half of its life left: the same URL"
    clock.now += 1.0
    time.sleep(1.1)  # a signature carries the time to the second: let it move on
    fresh = store.presign(digest)
    assert fresh != url, "less than half of its life left: signed again"

    time.sleep(1.1)  # the server's clock, not ours, decides expiry
    with pytest.raises(urllib.error.HTTPError) as expired:
        urllib.request.urlopen(url, timeout=10)
    assert expired.value.code == 403 and b"Request has expired" in expired.value.read()


def test_an_unknown_key_or_a_missing_bucket_is_one_clear_error(s3_server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOT-A-KEY-OF-THIS-SERVER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"x")
    with pytest.raises(StoreUnavailable, match=r"object store s3://.*: .*failed"):
        _store(s3_server, tmp_path, "x").put(upload)
    assert upload.exists(), "a refused upload loses nothing of the caller's"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    missing = S3BundleStore("s3://no-such-bucket", staging_dir=tmp_path, endpoint_url=s3_server.endpoint_url)
    with pytest.raises(StoreUnavailable, match="no-such-bucket: checking the bucket failed"):
        missing.check()
    with pytest.raises(ConfigError, match="expected s3://BUCKET"):
        S3BundleStore("https://bucket", staging_dir=tmp_path)
    with pytest.raises(NotFound):
        _store(s3_server, tmp_path, "x").presign("../../etc/passwd")


def test_settings_choose_the_store(tmp_path: Path, s3_env) -> None:
    assert isinstance(store_for(FleetSettings(data_dir=tmp_path)), FileBundleStore)
    store = store_for(FleetSettings(data_dir=tmp_path, bundle_store=f"s3://{s3_env.bucket}/fleet",
                                    s3_endpoint_url=s3_env.endpoint_url + "/", presign_expires_s=120))
    assert isinstance(store, S3BundleStore)
    assert (store.bucket, store.prefix, store.expires_s) == (s3_env.bucket, "fleet", 120)
    store.check()
    with pytest.raises(ValueError, match="s3://"):
        FleetSettings(data_dir=tmp_path, bundle_store="/var/bundles")
