"""Bundles: accept an upload only once it verifies, keep it by sha256, list, describe, promote, serve ranges.

An upload arrives as a file in the store's incoming folder (`BundleStore.new_upload`). `add_bundle`
verifies it completely with `edgepack.bundle.open_bundle` against the server's trusted keys — signature,
every member's hash and size, safe member paths — before anything is recorded; a refused upload is
deleted and its error (a `BundleError` naming the problem) propagates. The bundle id is the sha256 of
the file, so uploading the same bundle twice is harmless.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgepack.bundle import open_bundle
from edgepack.errors import BundleError, ConfigError, EdgepackError, NotFound, RangeNotSatisfiable
from edgepack.files import file_sha256
from edgepack.manifest import BundleManifest
from fleet import metrics
from fleet.models import Bundle
from fleet.services import audit
from fleet.store import BundleStore

STAGES: tuple[str, ...] = ("staging", "production")
API_PREFIX = "/api/v1"
# The manifest fields the bundles table indexes, with its column widths.
_LIMITS = {"name": 128, "version": 64, "profile": 64, "runtime": 32, "precision": 16}
_HEX_PREFIX = re.compile(r"^[0-9a-f]{8,64}$")
_CHUNK = 256 * 1024


def _manifest_fields(manifest: BundleManifest) -> dict[str, str]:
    """The indexed columns of a verified manifest (whose fields are typed already); too long is refused."""
    fields = {"name": manifest.name, "version": manifest.version, "profile": manifest.profile,
              "runtime": manifest.runtime, "precision": manifest.precision}
    for key, value in fields.items():
        if not value.strip():
            raise BundleError(f"manifest.json: field '{key}' is blank", member="manifest.json", field=key)
        if len(value) > _LIMITS[key]:
            raise BundleError(f"manifest.json: field '{key}' is longer than {_LIMITS[key]} characters",
                              member="manifest.json", field=key)
    return fields


def add_bundle(session: Session, store: BundleStore, upload: Path, *, trusted_keys: list[Ed25519PublicKey],
               actor: str) -> tuple[Bundle, bool]:
    """Verify the uploaded file, store and record it; returns (bundle, created).

    `upload` is consumed either way: moved into the store, or deleted when the bundle is refused (the
    `BundleError`/`SignatureError`/`IntegrityError`/`UnsafeMemberError` is re-raised). A bundle already
    known returns (existing, False) without a new audit entry.
    """
    upload = Path(upload)
    try:
        verified = open_bundle(upload, trusted_keys)
        fields = _manifest_fields(verified.manifest)
        sha256 = file_sha256(upload)
        size = upload.stat().st_size
    except EdgepackError as exc:
        upload.unlink(missing_ok=True)
        metrics.BUNDLES_REFUSED.labels(type(exc).__name__).inc()
        raise
    except BaseException:
        upload.unlink(missing_ok=True)
        raise

    existing = session.get(Bundle, sha256)
    was_stored = store.exists(sha256)
    stored_sha = store.put(upload)
    if stored_sha != sha256:  # the file changed between verification and storing
        store.delete(stored_sha)
        raise BundleError("the upload changed while it was being verified; send it again")
    metrics.BUNDLES_UPLOADED.inc()
    if existing is not None:
        return existing, False

    bundle = Bundle(id=sha256, size_bytes=size, key_id=verified.key_id, manifest=verified.manifest.to_json_dict(),
                    stage=None, uploaded_by=actor, **fields)
    session.add(bundle)
    audit.record(session, actor, "bundle.upload", sha256,
                 {"name": fields["name"], "version": fields["version"], "profile": fields["profile"],
                  "size_bytes": size, "key_id": verified.key_id})
    try:
        session.commit()
    except sa_exc.IntegrityError:
        # The same bundle uploaded concurrently: the other request recorded it first.
        session.rollback()
        existing = session.get(Bundle, sha256)
        if existing is None:
            raise
        return existing, False
    except BaseException:
        session.rollback()
        if not was_stored:
            store.delete(sha256)
        raise
    return bundle, True


def get_bundle(session: Session, bundle_id: str) -> Bundle:
    """A bundle by its id (sha256) or an unambiguous prefix of at least 8 hex digits; NotFound otherwise."""
    if not isinstance(bundle_id, str) or not _HEX_PREFIX.match(bundle_id):
        raise NotFound(f"no bundle {bundle_id!r} (ids are sha256 hex digests, or a prefix of 8 or more)",
                       bundle_id=bundle_id)
    if len(bundle_id) == 64:
        bundle = session.get(Bundle, bundle_id)
        if bundle is None:
            raise NotFound(f"no bundle {bundle_id}", bundle_id=bundle_id)
        return bundle
    matches = list(session.scalars(select(Bundle).where(Bundle.id.startswith(bundle_id)).limit(2)))
    if not matches:
        raise NotFound(f"no bundle {bundle_id}", bundle_id=bundle_id)
    if len(matches) > 1:
        raise ConfigError(f"bundle id prefix {bundle_id} is ambiguous; give more digits", bundle_id=bundle_id)
    return matches[0]


def list_bundles(session: Session, *, name: str | None = None, profile: str | None = None,
                 stage: str | None = None) -> list[Bundle]:
    """Bundles, newest first, optionally only one name, profile or stage."""
    query = select(Bundle).order_by(Bundle.uploaded_at.desc(), Bundle.id)
    if name:
        query = query.where(Bundle.name == name)
    if profile:
        query = query.where(Bundle.profile == profile)
    if stage:
        query = query.where(Bundle.stage == stage)
    return list(session.scalars(query))


def promote(session: Session, bundle_id: str, stage: str, *, actor: str) -> Bundle:
    """Move a bundle to `staging` or `production`; the change is audited with where it came from."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)}", stage=stage)
    bundle = get_bundle(session, bundle_id)
    previous = bundle.stage
    bundle.stage = stage
    audit.record(session, actor, "bundle.promote", bundle.id,
                 {"from": previous, "to": stage, "name": bundle.name, "version": bundle.version,
                  "profile": bundle.profile})
    session.commit()
    return bundle


def download_path(bundle_id: str) -> str:
    return f"{API_PREFIX}/bundles/{bundle_id}/download"


# ---------------------------------------------------------------------------------------------------
# downloads


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range of a file of `size` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.size}"


_RANGE_SPEC = re.compile(r"^(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a `Range` header asks for, or None to send the whole file.

    `bytes=a-b`, `bytes=a-` and `bytes=-n` are served (an end past the file is clamped); a header in
    another unit, with several ranges, or malformed is ignored, as RFC 9110 allows. A well-formed range
    that starts past the end, or an empty suffix, raises RangeNotSatisfiable (416).
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _RANGE_SPEC.match(spec.strip())
    if not match or match.group(0) == "-":
        return None
    first, last = match.groups()
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {spec.strip()} selects no bytes of a {size}-byte bundle", size=size)
        return ByteRange(start=max(0, size - suffix), end=size - 1, size=size)
    start = int(first)
    end = size - 1 if last == "" else int(last)
    if last != "" and end < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"range {spec.strip()} starts past the end of a {size}-byte bundle", size=size)
    return ByteRange(start=start, end=min(end, size - 1), size=size)


def etag(bundle_id: str) -> str:
    return f'"{bundle_id}"'


def range_applies(if_range: str | None, bundle_id: str) -> bool:
    """RFC 9110 If-Range: honour Range only when the validator is our (strong) ETag; a date or another
    tag means the client's partial copy may be of something else, so it gets the whole file."""
    return if_range is None or if_range.strip() == etag(bundle_id)


def presigned_download(store: BundleStore, bundle: Bundle) -> str | None:
    """A fresh presigned URL of the bundle when the store gives them, else None (the fleet serves it)."""
    url = store.presign(bundle.id)
    if url is not None:
        metrics.BUNDLE_REDIRECTS.inc()
    return url


def iter_file(store: BundleStore, bundle_id: str, byte_range: ByteRange | None, size: int) -> Iterator[bytes]:
    """The bytes of a stored bundle, all of them or one range, in chunks."""
    start, remaining = (byte_range.start, byte_range.length) if byte_range else (0, size)
    with store.open(bundle_id) as handle:
        handle.seek(start)
        while remaining > 0:
            chunk = handle.read(min(_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            metrics.BUNDLE_BYTES_SERVED.inc(len(chunk))
            yield chunk


__all__ = [
    "STAGES",
    "ByteRange",
    "add_bundle",
    "download_path",
    "etag",
    "get_bundle",
    "iter_file",
    "list_bundles",
    "parse_range",
    "presigned_download",
    "promote",
    "range_applies",
]
