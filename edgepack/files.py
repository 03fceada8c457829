"""The sha256 of a file, and files that are written whole or not at all.

    digest = file_sha256(path)                       # lower-case hex
    digest, size = file_sha256_size(path)            # hex and byte count in one read
    atomic_write(path, data, mode=0o600)             # bytes, or str (UTF-8)
    with atomic_writer(path) as handle:              # stream into the temp file; replaced on a clean exit
        handle.write(chunk)

A write goes to a temp file in the target's own folder (so the rename never crosses a filesystem), is
fsync'd, replaces the target with `os.replace`, and then the folder is fsync'd so the rename itself
survives a power cut. A reader sees the old content or the new, never a mix. On any error, the temp file
is removed and the target is untouched. The temp file's mode is set explicitly (not from the umask),
before any data is written, so a secret never sits in a file more open than `mode`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 20
TEMP_SUFFIX = ".tmp"
"""Temp files are `.<name>.<random>.tmp` beside their target; a recovery step may glob and remove them."""


def file_sha256_size(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of the file at `path`, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of the file at `path`."""
    return file_sha256_size(path)[0]


def fsync_dir(directory: Path) -> None:
    """Make a rename or removal in `directory` durable (its entry list is data too)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: Path, *, mode: int = 0o644,
                  before_replace: Callable[[Path], None] | None = None) -> Iterator[BinaryIO]:
    """A binary handle on a temp file beside `path`; on a clean exit it replaces `path`, else vanishes.

    `before_replace(temp_path)` runs after the data is durable and before the rename (a fault-injection
    point for crash tests, or a last look at the bytes; raising there leaves `path` as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace(Path(temp_name))
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644,
                 before_replace: Callable[[Path], None] | None = None) -> None:
    """Replace `path` with `data` (a str is written as UTF-8) so a reader sees old or new, never a mix."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_writer(path, mode=mode, before_replace=before_replace) as handle:
        handle.write(payload)


__all__ = ["CHUNK_BYTES", "TEMP_SUFFIX", "atomic_write", "atomic_writer", "file_sha256", "file_sha256_size", "fsync_dir"]
