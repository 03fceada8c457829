"""FileBundleStore: content-addressed, sharded, atomic, refuses ids that are not sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edgepack.errors import NotFound
from fleet.store import BundleStore, FileBundleStore


def test_put_keeps_bytes_under_their_sha256_sharded_by_prefix(tmp_path: Path) -> None:
    store = FileBundleStore(tmp_path / "store")
    source = tmp_path / "a.bin"
    source.write_bytes(b"bundle bytes" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()

    assert store.put(source) == digest

    assert isinstance(store, BundleStore)
    assert store.path(digest) == tmp_path / "store" / digest[:2] / digest
    assert store.exists(digest) and store.size(digest) == source.stat().st_size
    with store.open(digest) as handle:
        assert handle.read() == source.read_bytes()
    assert source.exists(), "a file from outside the store is copied, not moved"
    assert store.files() == [store.path(digest)]


def test_an_upload_is_moved_in_and_a_duplicate_leaves_one_copy(tmp_path: Path) -> None:
    store = FileBundleStore(tmp_path / "store")
    first, second = store.new_upload(), store.new_upload()
    first.write_bytes(b"same")
    second.write_bytes(b"same")

    assert store.put(first) == store.put(second)

    assert not first.exists() and not second.exists()
    assert len(store.files()) == 1


def test_delete_and_missing_bundles(tmp_path: Path) -> None:
    store = FileBundleStore(tmp_path / "store")
    upload = store.new_upload()
    upload.write_bytes(b"x")
    digest = store.put(upload)

    store.delete(digest)

    assert not store.exists(digest)
    with pytest.raises(NotFound):
        store.open(digest)
    with pytest.raises(NotFound):
        store.size(digest)
    store.delete(digest)  # deleting twice is fine


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ab", "A" * 64, "g" * 64, "0" * 63 + "/"])
def test_ids_that_are_not_sha256_never_become_paths(tmp_path: Path, bad: str) -> None:
    store = FileBundleStore(tmp_path / "store")
    with pytest.raises(NotFound):
        store.path(bad)
    assert not store.exists(bad)
