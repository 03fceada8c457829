"""The `.edgepack` bundle: a deterministic, signed, uncompressed tar.

Layout (in this order): `manifest.json`, `manifest.sig`, then directory entries and members sorted by
name. Every entry has mtime `$SOURCE_DATE_EPOCH` (default 0), uid/gid 0, empty owner names, mode 0644
(files) or 0755 (directories), so identical inputs give a byte-identical file.

`manifest.json` is canonical JSON of an `edgepack.manifest.BundleManifest` and lists every member as
`files: {path: {sha256, size}}`; `manifest.sig` signs its exact bytes (see `edgepack.signing`).

Reading never trusts the archive: `open_bundle` refuses unsafe members (absolute paths, `..`, links,
devices, duplicates), checks the signature against trusted keys, then the size and sha256 of every
listed member and the absence of unlisted ones, all before a single byte is written anywhere; a
manifest that is not a valid `BundleManifest` is refused with one line naming the field.
`VerifiedBundle.read` and `.extract` hash what they hand out again, so a bundle swapped on disk after
verification is caught too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgepack.errors import BundleError, ConfigError, IntegrityError, SignatureError, UnsafeMemberError
from edgepack.files import atomic_writer, file_sha256_size
from edgepack.manifest import BUNDLE_FORMAT, BundleManifest, ManifestContent, parse_content, parse_manifest
from edgepack.signing import sign_manifest, verify_manifest_signature

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})

# The manifest and signature are read into memory before anything is trusted; cap them.
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_MAX_SIGNATURE_BYTES = 64 * 1024
_CHUNK = 1024 * 1024
_DRIVE_LETTER = re.compile(r"[A-Za-z]:")

__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "BundleInfo",
    "VerifiedBundle",
    "canonical_json",
    "inspect_bundle",
    "manifest_from_bytes",
    "open_bundle",
    "read_manifest_unverified",
    "write_bundle",
]


# ---------------------------------------------------------------------------------------------------
# canonical JSON and member names


def canonical_json(obj: object) -> bytes:
    """Sorted keys, no spaces, UTF-8; NaN and infinity are refused (BundleError)."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (ValueError, TypeError) as exc:
        raise BundleError(f"value cannot be written as canonical JSON: {exc}") from exc


def _show(name: str) -> str:
    """A member name safe to print: as is when printable, else its repr."""
    return name if name.isprintable() else repr(name)


def _name_problem(name: str) -> str | None:
    """Why `name` is not a safe, normalised, relative POSIX member path; None when it is."""
    if not name:
        return "empty name"
    if not name.isprintable():
        return "control or undecodable character in name"
    if "\\" in name:
        return "backslash in path"
    if name.startswith("/"):
        return "absolute path"
    if _DRIVE_LETTER.match(name):
        return "drive-letter path"
    parts = name.split("/")
    if ".." in parts:
        return "'..' component escapes the bundle"
    if any(part in ("", ".") for part in parts):
        return "path is not normalised"
    return None


def _check_member_name(name: str) -> None:
    problem = _name_problem(name)
    if problem is not None:
        raise UnsafeMemberError(f"{_show(name)}: unsafe member ({problem})", member=name)


def _type_problem(info: tarfile.TarInfo) -> str | None:
    if info.isdir():
        return None
    if info.issparse():
        return "sparse file"
    if info.isreg():
        return None
    if info.issym():
        return f"symlink to {_show(info.linkname)}"
    if info.islnk():
        return f"hard link to {_show(info.linkname)}"
    if info.ischr() or info.isblk():
        return "device file"
    if info.isfifo():
        return "fifo"
    return f"unsupported entry type {info.type!r}"


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _check_no_file_dir_clash(file_names: set[str], dir_names: set[str] | frozenset[str] = frozenset()) -> None:
    # "model" as a file and "model/x" as a member cannot both exist on disk; refuse rather than guess.
    for name in sorted(file_names | dir_names):
        if name in file_names and name in dir_names:
            raise UnsafeMemberError(f"{_show(name)}: unsafe member (is both a file and a folder)", member=name)
        for parent in _parents(name):
            if parent in file_names:
                raise UnsafeMemberError(
                    f"{_show(parent)}: unsafe member (is a file and also the folder of {_show(name)})",
                    member=parent,
                )


# ---------------------------------------------------------------------------------------------------
# writing


@dataclass(frozen=True)
class BundleInfo:
    """A bundle just written: where, its sha256 and size, and the manifest as signed."""

    path: Path
    sha256: str
    size_bytes: int
    manifest: BundleManifest


def _source_date_epoch() -> int:
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"SOURCE_DATE_EPOCH must be an integer number of seconds, got {raw!r}") from exc
    if value < 0:
        raise ConfigError(f"SOURCE_DATE_EPOCH must not be negative, got {value}")
    return value


def _tar_entry(name: str, *, mtime: int, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    info.size = 0 if is_dir else size
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _HashingReader:
    """Feeds tarfile from a file while hashing what it hands over."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data


def write_bundle(
    path: Path,
    members: Mapping[str, bytes | Path],
    manifest: ManifestContent | Mapping[str, Any],
    private_key: Ed25519PrivateKey,
) -> BundleInfo:
    """Write a signed, deterministic bundle to `path` and return what was written.

    `members` maps member paths ("model/model.onnx", "reference/stats.json", …) to their bytes, or to
    a file to stream from for large models. `manifest` is the content (a mapping is validated first,
    so nothing malformed gets signed; its `format` and `files`, if any, are ignored): `format` and
    `files` are filled in, and the result is signed and returned as `BundleInfo.manifest`. The file
    appears atomically (temp file in the same folder, then rename); on error nothing is left behind.
    """
    path = Path(path)
    checked = parse_content(manifest)
    mtime = _source_date_epoch()

    files: dict[str, dict[str, object]] = {}
    for name, content in members.items():
        _check_member_name(name)
        if name in RESERVED_NAMES:
            raise BundleError(f"{name}: reserved name, cannot be a bundle member", member=name)
        if isinstance(content, (bytes, bytearray, memoryview)):
            data = bytes(content)
            files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        elif isinstance(content, Path):
            try:
                digest, size = file_sha256_size(content)
            except OSError as exc:
                raise ConfigError(f"{name}: cannot read {content}: {exc.strerror or exc}", member=name) from exc
            files[name] = {"sha256": digest, "size": size}
        else:
            raise TypeError(f"{name}: member content must be bytes or a Path, not {type(content).__name__}")
    _check_no_file_dir_clash(set(files))

    signed_manifest = BundleManifest.model_validate(
        {**checked.model_dump(exclude={"format", "files"}), "format": BUNDLE_FORMAT, "files": {name: files[name] for name in sorted(files)}}
    )
    manifest_bytes = canonical_json(signed_manifest.to_json_dict())
    signature_bytes = canonical_json(sign_manifest(manifest_bytes, private_key))

    directories = {parent for name in files for parent in _parents(name)}
    ordered = sorted([(name, True) for name in directories] + [(name, False) for name in files])

    hashed: dict[str, tuple[str, int]] = {}

    def hash_before_replace(temp_path: Path) -> None:
        hashed["bundle"] = file_sha256_size(temp_path)  # the bytes that land, hashed once they are durable

    try:
        with atomic_writer(path, mode=0o644, before_replace=hash_before_replace) as handle:
            with tarfile.open(fileobj=handle, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
                for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, signature_bytes)):
                    tar.addfile(_tar_entry(name, mtime=mtime, size=len(data)), _BytesReader(data))
                for name, is_dir in ordered:
                    if is_dir:
                        tar.addfile(_tar_entry(name, mtime=mtime, is_dir=True))
                        continue
                    entry = _tar_entry(name, mtime=mtime, size=int(files[name]["size"]))
                    content = members[name]
                    if isinstance(content, Path):
                        with open(content, "rb") as source:
                            reader = _HashingReader(source)
                            tar.addfile(entry, reader)
                        if reader.digest.hexdigest() != files[name]["sha256"]:
                            raise ConfigError(f"{name}: {content} changed while the bundle was written", member=name)
                    else:
                        tar.addfile(entry, _BytesReader(bytes(content)))
    except OSError as exc:  # the temp file is gone and `path` is as it was (atomic_writer)
        raise ConfigError(f"cannot write bundle {path}: {exc.strerror or exc}", path=path) from exc
    bundle_sha256, size_bytes = hashed["bundle"]
    return BundleInfo(path=path, sha256=bundle_sha256, size_bytes=size_bytes, manifest=signed_manifest)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size is None or size < 0 else self._pos + size
        chunk = bytes(self._data[self._pos : end])
        self._pos += len(chunk)
        return chunk


# ---------------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    offset: int  # of the data in the (uncompressed) tar


@dataclass(frozen=True)
class _Scan:
    """What a bundle's headers say, after every entry has been found safe."""

    path: Path
    files: dict[str, _Member]
    directories: frozenset[str]
    manifest_bytes: bytes
    signature_bytes: bytes


def _scan(bundle_path: Path) -> _Scan:
    """Read all headers, refuse unsafe entries, and read manifest.json and manifest.sig."""
    path = Path(bundle_path)
    if not path.exists():
        raise ConfigError(f"bundle not found: {path}", path=path)
    if not path.is_file():
        raise BundleError(f"{path.name}: not an edgepack bundle (not a file)", path=path)
    try:
        # "r:" accepts only an uncompressed tar, which is what member offsets below rely on.
        with tarfile.open(path, mode="r:", encoding="utf-8") as tar:
            infos = tar.getmembers()
    except tarfile.ReadError as exc:
        raise BundleError(f"{path.name}: not an edgepack bundle ({exc})", path=path) from exc
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(f"{path.name}: truncated or corrupt bundle ({exc})", path=path) from exc

    files: dict[str, _Member] = {}
    directories: set[str] = set()
    for info in infos:
        _check_member_name(info.name)
        problem = _type_problem(info)
        if problem is not None:
            raise UnsafeMemberError(f"{_show(info.name)}: unsafe member ({problem})", member=info.name)
        if info.name in files or info.name in directories:
            raise UnsafeMemberError(f"{_show(info.name)}: unsafe member (appears twice)", member=info.name)
        if info.isdir():
            directories.add(info.name)
        else:
            files[info.name] = _Member(name=info.name, size=info.size, offset=info.offset_data)
    _check_no_file_dir_clash(set(files), directories)

    for name in RESERVED_NAMES:
        if name not in files:
            raise BundleError(f"{path.name}: not an edgepack bundle ({name} missing)", path=path, member=name)
    with open(path, "rb") as handle:
        manifest_bytes = _read_small(handle, files[MANIFEST_NAME], _MAX_MANIFEST_BYTES)
        signature_bytes = _read_small(handle, files[SIGNATURE_NAME], _MAX_SIGNATURE_BYTES)
    return _Scan(
        path=path,
        files=files,
        directories=frozenset(directories),
        manifest_bytes=manifest_bytes,
        signature_bytes=signature_bytes,
    )


def _read_small(handle: BinaryIO, member: _Member, limit: int) -> bytes:
    if member.size > limit:
        raise BundleError(f"{member.name}: {member.size} bytes, larger than the {limit} allowed", member=member.name)
    handle.seek(member.offset)
    data = handle.read(member.size)
    if len(data) != member.size:
        raise BundleError(f"{member.name}: truncated bundle", member=member.name)
    return data


def _iter_member_data(handle: BinaryIO, member: _Member) -> Iterator[bytes]:
    handle.seek(member.offset)
    remaining = member.size
    while remaining:
        chunk = handle.read(min(_CHUNK, remaining))
        if not chunk:
            raise IntegrityError(f"{member.name}: truncated bundle (data ends early)", member=member.name)
        remaining -= len(chunk)
        yield chunk


def _member_sha256(handle: BinaryIO, member: _Member) -> str:
    digest = hashlib.sha256()
    for chunk in _iter_member_data(handle, member):
        digest.update(chunk)
    return digest.hexdigest()


def _reject_constant(value: str) -> object:
    raise ValueError(f"{value} is not allowed")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # Two parsers that resolve a duplicate key differently would read different signed manifests.
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_json_object(data: bytes, what: str, error: type[BundleError]) -> dict:
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{what} is not valid JSON ({exc})", member=what) from exc
    if not isinstance(value, dict):
        raise error(f"{what} is not a JSON object", member=what)
    return value


def _check_listed_names(document: dict) -> None:
    """Refuse unsafe or reserved member names in the manifest's `files` before anything else reads it."""
    listed = document.get("files")  # the raw JSON object: its shape is checked by parse_manifest next
    for name in listed if isinstance(listed, dict) else ():
        _check_member_name(name)
        if name in RESERVED_NAMES:
            raise BundleError(f"manifest.json lists the reserved name {name}", member=name)


def manifest_from_bytes(manifest_bytes: bytes) -> BundleManifest:
    """manifest.json's bytes as a BundleManifest: valid JSON, our format, safe names, every field as typed.

    Checks no signature: callers verify the bytes first (open_bundle, the agent's slot check).
    """
    document = _parse_json_object(manifest_bytes, MANIFEST_NAME, BundleError)
    bundle_format = document.get("format")
    if bundle_format != BUNDLE_FORMAT:
        raise BundleError(f"unsupported bundle format {bundle_format!r} (expected {BUNDLE_FORMAT!r})")
    _check_listed_names(document)
    return parse_manifest(document, MANIFEST_NAME)


def _manifest_files(manifest: BundleManifest) -> dict[str, tuple[int, str]]:
    """The manifest's `files` as {name: (size, sha256)}."""
    return {name: (entry.size, entry.sha256) for name, entry in manifest.files.items()}


def _check_against_manifest(scan: _Scan, listed: dict[str, tuple[int, str]]) -> dict[str, _Member]:
    """Every listed member present with the right size and sha256, and nothing unlisted."""
    for name in sorted(scan.files):
        if name not in listed and name not in RESERVED_NAMES:
            raise IntegrityError(
                f"{_show(name)}: member not listed in the manifest (bundle tampered?)", member=name
            )
    for name, (size, _) in sorted(listed.items()):
        member = scan.files.get(name)
        if member is None:
            raise IntegrityError(f"{_show(name)}: listed in the manifest but missing from the bundle", member=name)
        if member.size != size:
            raise IntegrityError(
                f"{_show(name)}: size {member.size} does not match the manifest's {size} (bundle tampered?)",
                member=name,
            )
    with open(scan.path, "rb") as handle:
        for name, (_, digest) in sorted(listed.items()):
            if _member_sha256(handle, scan.files[name]) != digest:
                raise IntegrityError(f"{_show(name)}: sha256 mismatch (bundle tampered?)", member=name)
    return {name: scan.files[name] for name in sorted(listed)}


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose paths, signature and member hashes all checked out.

    `read` and `extract` re-hash every byte they hand out against the signed manifest, so a file
    replaced on disk after `open_bundle` raises IntegrityError instead of slipping through.
    """

    path: Path
    manifest: BundleManifest
    key_id: str
    manifest_bytes: bytes
    signature_bytes: bytes
    _members: dict[str, _Member] = field(repr=False)
    _digests: dict[str, str] = field(repr=False)

    @property
    def members(self) -> tuple[str, ...]:
        """The payload members listed in the manifest, sorted (manifest.json/.sig not included)."""
        return tuple(self._members)

    def read(self, member: str) -> bytes:
        """The verified bytes of one payload member."""
        record = self._record(member)
        chunks: list[bytes] = []
        with open(self.path, "rb") as handle:
            self._copy_verified(handle, record, chunks.append)
        return b"".join(chunks)

    def extract(self, dest: Path) -> Path:
        """Write manifest.json, manifest.sig and every member under `dest` (absent or empty).

        Files go into a temp folder beside `dest`, which is renamed into place only once every
        member has been written and re-verified; on any error `dest` is left as it was.
        """
        dest = Path(dest)
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            raise ConfigError(f"cannot extract into {dest}: exists and is not a folder", path=dest)
        if dest.exists() and any(dest.iterdir()):
            raise ConfigError(f"cannot extract into {dest}: folder is not empty", path=dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
        try:
            staging_root = staging.resolve()
            with open(self.path, "rb") as source:
                _write_new(staging, staging_root, MANIFEST_NAME, lambda sink: sink(self.manifest_bytes))
                _write_new(staging, staging_root, SIGNATURE_NAME, lambda sink: sink(self.signature_bytes))
                for name, record in self._members.items():
                    _write_new(staging, staging_root, name, lambda sink, r=record: self._copy_verified(source, r, sink))
            os.chmod(staging, 0o755)
            if dest.exists():
                dest.rmdir()
            os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return dest

    def _record(self, member: str) -> _Member:
        record = self._members.get(member)
        if record is None:
            raise BundleError(f"{_show(member)}: not a member of this bundle", member=member)
        return record

    def _copy_verified(self, handle: BinaryIO, record: _Member, sink: Callable[[bytes], object]) -> None:
        digest = hashlib.sha256()
        for chunk in _iter_member_data(handle, record):
            digest.update(chunk)
            sink(chunk)
        if digest.hexdigest() != self._digests[record.name]:
            raise IntegrityError(
                f"{_show(record.name)}: sha256 mismatch (bundle changed on disk after verification?)",
                member=record.name,
            )


_Producer = Callable[[Callable[[bytes], object]], None]


def _write_new(root: Path, root_resolved: Path, name: str, produce: _Producer) -> None:
    _check_member_name(name)
    target = root.joinpath(*name.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Names were checked already; this guards against anything the checks did not foresee.
    if not target.parent.resolve().is_relative_to(root_resolved):
        raise UnsafeMemberError(f"{_show(name)}: unsafe member (resolves outside the destination)", member=name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as out:
        produce(out.write)
        out.flush()
        os.fsync(out.fileno())


def open_bundle(path: Path, trusted_keys: list[Ed25519PublicKey]) -> VerifiedBundle:
    """Check a bundle completely (paths, signature, every member's size and sha256) before use."""
    scan = _scan(path)
    signature_doc = _parse_json_object(scan.signature_bytes, SIGNATURE_NAME, SignatureError)
    signer = verify_manifest_signature(scan.manifest_bytes, signature_doc, trusted_keys)
    manifest = manifest_from_bytes(scan.manifest_bytes)
    listed = _manifest_files(manifest)
    members = _check_against_manifest(scan, listed)
    return VerifiedBundle(
        path=scan.path,
        manifest=manifest,
        key_id=signer,
        manifest_bytes=scan.manifest_bytes,
        signature_bytes=scan.signature_bytes,
        _members=members,
        _digests={name: digest for name, (_, digest) in listed.items()},
    )


def read_manifest_unverified(path: Path) -> BundleManifest:
    """The manifest of a bundle whose entries are safe, WITHOUT checking signature or hashes."""
    return manifest_from_bytes(_scan(path).manifest_bytes)


def inspect_bundle(path: Path) -> dict:
    """Describe a bundle without a trusted key (still refusing unsafe entries).

    Returns {"manifest" (the JSON object as written), "manifest_problem" (None, or the one line saying
    why it is not a valid BundleManifest), "signature" (the sig document, or None if unreadable),
    "files": [{"path", "size", "sha256", "status"}], "bundle_sha256", "size_bytes"}, where status is
    "ok", "missing", "size mismatch", "sha256 mismatch" or "not in manifest". The signature is not
    checked. A manifest that does not validate is still described, so it can be looked at.
    """
    scan = _scan(path)
    document = _parse_json_object(scan.manifest_bytes, MANIFEST_NAME, BundleError)
    try:
        signature: dict | None = _parse_json_object(scan.signature_bytes, SIGNATURE_NAME, SignatureError)
    except SignatureError:
        signature = None
    try:
        listed = _manifest_files(manifest_from_bytes(scan.manifest_bytes))
        problem = None
    except UnsafeMemberError:
        raise
    except BundleError as exc:
        problem = exc.message
        listed = _listed_as_written(document)

    rows = []
    with open(scan.path, "rb") as handle:
        for name, (size, digest) in sorted(listed.items()):
            member = scan.files.get(name)
            if member is None:
                status = "missing"
            elif member.size != size:
                status = "size mismatch"
            elif _member_sha256(handle, member) != digest:
                status = "sha256 mismatch"
            else:
                status = "ok"
            rows.append({"path": name, "size": size, "sha256": digest, "status": status})
        for name in sorted(set(scan.files) - set(listed) - RESERVED_NAMES):
            member = scan.files[name]
            rows.append(
                {
                    "path": name,
                    "size": member.size,
                    "sha256": _member_sha256(handle, member),
                    "status": "not in manifest",
                }
            )
    bundle_sha256, size_bytes = file_sha256_size(scan.path)
    return {
        "manifest": document,
        "manifest_problem": problem,
        "signature": signature,
        "files": rows,
        "bundle_sha256": bundle_sha256,
        "size_bytes": size_bytes,
    }


def _listed_as_written(document: dict) -> dict[str, tuple[int, str]]:
    """The well-formed entries of a manifest's `files` table that failed validation elsewhere."""
    listed = document.get("files")
    result: dict[str, tuple[int, str]] = {}
    for name, entry in (listed.items() if isinstance(listed, dict) else ()):
        if isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str):
            result[name] = (entry["size"], entry["sha256"])
    return result
