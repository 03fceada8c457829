"""Content-addressed bundle store: a bundle's bytes are kept under their sha256.

`BundleStore` is the small interface the services use. `FileBundleStore` (the default) keeps files on disk,

    ROOT/ab/abcdef…            one file per bundle, sharded by the first two hex digits
    ROOT/.incoming/…           uploads being received and verified (same filesystem, so `put` renames)

Every write goes to a temp file in the store and is renamed into place after an fsync, so a reader
never sees a partial bundle and a crash leaves at most a stray file in `.incoming/`.

`S3BundleStore` keeps the same layout as objects in an S3-compatible bucket (`PREFIX/ab/abcdef…`). An
upload is received and verified in a local staging folder exactly as with the folder store and only then
copied to the bucket, so the bucket never holds a bundle the fleet did not verify. Downloads do not pass
through the fleet: `presign` gives an expiring GET URL that devices fetch from the store (or a CDN in
front of it) with Range, and the fleet's download route answers with a redirect to a fresh one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol, runtime_checkable
from urllib.parse import urlsplit

from edgepack.errors import ConfigError, NotFound, StoreUnavailable
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

    def open(self, sha256: str) -> BinaryIO:
        """The bundle's bytes, seekable."""
        ...

    def presign(self, sha256: str) -> str | None:
        """An absolute, expiring URL devices may GET the bundle from (Range included), or None when the
        fleet serves the bytes itself."""
        ...

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

    def presign(self, sha256: str) -> str | None:
        return None

    def files(self) -> list[Path]:
        """Every file under the root, `.incoming/` included (for checks that nothing was left behind)."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.rglob("*") if p.is_file())


def _hex_of(sha256: str) -> str:
    return f"{sha256[:2]}/{sha256}"


class S3BundleStore:
    """A `BundleStore` in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, R2, …) through boto3.

    `url` is `s3://BUCKET[/PREFIX]`; `endpoint_url` names a server other than AWS; credentials come from
    boto3's usual chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, an instance role). Presigned
    URLs are reused while at least half of their life is left, so a wave of ten thousand devices costs a
    handful of signatures, and every device still gets at least `expires_s / 2` seconds to start.
    """

    def __init__(self, url: str, *, staging_dir: Path, endpoint_url: str | None = None, region: str | None = None,
                 expires_s: int = 900, client: Any = None, clock: Callable[[], float] = time.time) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"bundle store {url!r}: expected s3://BUCKET or s3://BUCKET/PREFIX", store=url)
        if not 1 <= expires_s <= 604_800:
            raise ConfigError(f"presigned URL lifetime {expires_s} s: S3 allows 1 s to 7 days", expires_s=expires_s)
        self.url = url
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.expires_s = int(expires_s)
        self.incoming = Path(staging_dir) / INCOMING
        self._clock = clock
        self._signed: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        if client is None:
            client = _s3_client(endpoint_url, region)
        self.client = client

    def key(self, sha256: str) -> str:
        check_sha256(sha256)
        return f"{self.prefix}/{_hex_of(sha256)}" if self.prefix else _hex_of(sha256)

    def _call(self, what: str, sha256: str | None, call: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if sha256 is not None and code in ("404", "NoSuchKey", "NotFound"):
                raise NotFound(f"bundle {sha256} is not in the store", bundle_id=sha256) from None
            if sha256 is None and status == 404:
                code = "no such bucket"
            raise StoreUnavailable(f"object store {self.url}: {what} failed: {code or status} "
                                   f"{exc.response.get('Error', {}).get('Message', '')}".rstrip(),
                                   store=self.url) from None
        except BotoCoreError as exc:
            raise StoreUnavailable(f"object store {self.url}: {what} failed: {exc}", store=self.url) from None

    def check(self) -> None:
        """Fail with StoreUnavailable unless the bucket answers to our credentials (at startup)."""
        self._call("checking the bucket", None, lambda: self.client.head_bucket(Bucket=self.bucket))

    def new_upload(self) -> Path:
        self.incoming.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.incoming, prefix="upload-", suffix=".partial")
        os.close(fd)
        return Path(name)

    def put(self, path: Path) -> str:
        path = Path(path)
        moved = path.resolve().parent == self.incoming.resolve()
        try:
            sha256 = file_sha256(path)
            if not self.exists(sha256):
                key = self.key(sha256)
                self._call(f"uploading {key}", sha256, lambda: self.client.upload_file(
                    str(path), self.bucket, key,
                    ExtraArgs={"ContentType": "application/octet-stream", "Metadata": {"sha256": sha256}}))
            return sha256
        finally:
            if moved:
                path.unlink(missing_ok=True)

    def open(self, sha256: str) -> BinaryIO:
        handle = tempfile.TemporaryFile()
        try:
            key = self.key(sha256)
            self._call(f"reading {key}", sha256, lambda: self.client.download_fileobj(self.bucket, key, handle))
        except BaseException:
            handle.close()
            raise
        handle.seek(0)
        return handle  # type: ignore[return-value]

    def _head(self, sha256: str) -> dict[str, Any]:
        key = self.key(sha256)
        return self._call(f"looking up {key}", sha256, lambda: self.client.head_object(Bucket=self.bucket, Key=key))

    def exists(self, sha256: str) -> bool:
        try:
            self._head(sha256)
        except NotFound:
            return False
        return True

    def size(self, sha256: str) -> int:
        return int(self._head(sha256)["ContentLength"])

    def delete(self, sha256: str) -> None:
        key = self.key(sha256)
        self._call(f"deleting {key}", sha256, lambda: self.client.delete_object(Bucket=self.bucket, Key=key))
        with self._lock:
            self._signed.pop(sha256, None)

    def presign(self, sha256: str) -> str:
        key = self.key(sha256)
        now = self._clock()
        with self._lock:
            cached = self._signed.get(sha256)
            if cached is not None and cached[1] - now >= self.expires_s / 2:
                return cached[0]
        url = self._call(f"signing {key}", sha256, lambda: self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expires_s))
        with self._lock:
            self._signed[sha256] = (url, now + self.expires_s)
        return url


def _s3_client(endpoint_url: str | None, region: str | None) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("an s3:// bundle store needs boto3: pip install 'edgepack[s3]'") from None
    # Path-style addressing works with every S3-compatible server (virtual hosts need DNS for each bucket);
    # SigV4 is what presigned URLs on all of them accept. A few retries ride over a store's brief hiccup.
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                    retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60)
    # A session of its own: credentials are resolved for this store now, not cached from an earlier client.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region or "us-east-1",
                                          config=config)


def store_for(settings: Any) -> BundleStore:
    """The store a FleetSettings names: `bundle_store` s3://… or, by default, the folder in data_dir."""
    if settings.bundle_store:
        return S3BundleStore(settings.bundle_store, staging_dir=settings.data_dir / "staging",
                             endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                             expires_s=settings.presign_expires_s)
    return FileBundleStore(settings.store_dir)


__all__ = ["BundleStore", "FileBundleStore", "S3BundleStore", "StoreUnavailable", "check_sha256", "store_for"]
