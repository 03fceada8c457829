"""Content-addressed bundle store: a bundle's bytes are kept under their sha256.

`BundleStore` is the small interface the services use; `FileBundleStore` keeps files on disk,

    ROOT/ab/abcdef…            one file per bundle, sharded by the first two hex digits
    ROOT/.incoming/…           uploads being received and verified (same filesystem, so `put` renames)

Every write goes to a temp file in the store and is renamed into place after an fsync, so a reader
never sees a partial bundle and a crash leaves at most a stray file in `.incoming/`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from edgepack.errors import NotFound
from edgepack.files import file_sha256, fsync_dir

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
INCOMING = ".incoming"


def check_sha256(sha256: str) -> str:
    """A lower-case sha256 hex digest, or NotFound (ids come from URLs; never let one become a path)."""
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise NotFound(f"no bundle {sha256!r}: bundle ids are sha256 hex digests", bundle_id=sha256)
    return sha256


@runtime_checkable
class BundleStore(Protocol):
    """Where bundle files live, by sha256."""

    def new_upload(self) -> Path:
        """A new empty temp file inside the store for an upload; `put` moves it in, or delete it."""
        ...

    def put(self, path: Path) -> str:
        """Add the file's bytes under their sha256 and return it (a file from `new_upload` is moved)."""
        ...

    def open(self, sha256: str) -> BinaryIO: ...

    def path(self, sha256: str) -> Path: ...

    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int: ...

    def delete(self, sha256: str) -> None: ...


class FileBundleStore:
    """A `BundleStore` in a folder on the local filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / INCOMING

    def _ensure(self) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def new_upload(self) -> Path:
        self._ensure()
        fd, name = tempfile.mkstemp(dir=self.incoming, prefix="upload-", suffix=".partial")
        os.close(fd)
        return Path(name)

    def put(self, path: Path) -> str:
        path = Path(path)
        self._ensure()
        if path.resolve().parent != self.incoming.resolve():
            # Copy outside files into .incoming first so the final step is always a same-folder rename.
            staged = self.new_upload()
            try:
                shutil.copyfile(path, staged)
            except BaseException:
                staged.unlink(missing_ok=True)
                raise
            path = staged
        try:
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
            sha256 = file_sha256(path)
            target = self.path(sha256)
            if target.exists():
                path.unlink()
                return sha256
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o644)
            os.replace(path, target)
            fsync_dir(target.parent)
            return sha256
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def open(self, sha256: str) -> BinaryIO:
        try:
            return open(self.path(sha256), "rb")
        except FileNotFoundError:
            raise NotFound(f"bundle {sha256} is not in the store", bundle_id=sha256) from None

    def exists(self, sha256: str) -> bool:
        try:
            return self.path(sha256).is_file()
        except NotFound:
            return False

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"bundle {sha256} is not in the store", bundle_id=sha256) from None

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def files(self) -> list[Path]:
        """Every file under the root, `.incoming/` included (for checks that nothing was left behind)."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.rglob("*") if p.is_file())


__all__ = ["BundleStore", "FileBundleStore", "check_sha256"]
