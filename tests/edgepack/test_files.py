"""edgepack.files: one sha256 of a file, one atomic write."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from edgepack.files import CHUNK_BYTES, atomic_write, atomic_writer, file_sha256, file_sha256_size


def test_sha256_and_size_match_hashlib_over_several_chunks(tmp_path: Path) -> None:
    data = os.urandom(CHUNK_BYTES * 2 + 123)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)

    digest, size = file_sha256_size(path)

    assert digest == hashlib.sha256(data).hexdigest() == file_sha256(path)
    assert size == len(data)


def test_sha256_of_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert file_sha256_size(path) == (hashlib.sha256(b"").hexdigest(), 0)


def test_atomic_write_replaces_content_with_the_requested_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "token"
    atomic_write(path, "first\n", mode=0o600)
    atomic_write(path, b"second\n", mode=0o600)

    assert path.read_bytes() == b"second\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [entry.name for entry in path.parent.iterdir()] == ["token"]


def test_a_failure_before_the_rename_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"old")

    def crash(temp: Path) -> None:
        assert temp.parent == tmp_path and temp.read_bytes() == b"new"
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        atomic_write(path, b"new", before_replace=crash)

    assert path.read_bytes() == b"old"
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["state.json"]


def test_an_error_while_streaming_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "engine.plan"
    with pytest.raises(ValueError):
        with atomic_writer(path) as handle:
            handle.write(b"partial")
            raise ValueError("producer failed")

    assert list(tmp_path.iterdir()) == []


def test_streamed_write_appears_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    with atomic_writer(path, mode=0o644) as handle:
        for index in range(4):
            handle.write(bytes([index]) * 1000)
        assert not path.exists()  # nothing visible until the writer closes

    assert path.read_bytes() == b"".join(bytes([index]) * 1000 for index in range(4))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
