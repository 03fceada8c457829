"""The bundle format: determinism, verification, and refusal of tampered or unsafe archives.

Every test builds real tar files in tmp_path; tampered ones are crafted with tarfile or by flipping
bytes of a real bundle in place.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepack.bundle import (
    BUNDLE_FORMAT,
    canonical_json,
    inspect_bundle,
    open_bundle,
    read_manifest_unverified,
    write_bundle,
)
from edgepack.errors import BundleError, ConfigError, IntegrityError, SignatureError, UnsafeMemberError
from edgepack.manifest import FileEntry
from edgepack.signing import key_id, sign_manifest
from tests.edgepack.samples import manifest_content

MEMBERS = {
    "model/model.onnx": b"\x08\x07onnx-model-bytes" * 64,
    "reference/stats.json": b'{"inputs":{"bins":[0.1,0.5,0.9]}}',
    "selftest/inputs.npz": bytes(range(256)) * 4,
    "sbom.cdx.json": b'{"bomFormat":"CycloneDX","components":[]}',
}
MANIFEST = manifest_content()
EXPECTED_ORDER = [
    "manifest.json",
    "manifest.sig",
    "model",
    "model/model.onnx",
    "reference",
    "reference/stats.json",
    "sbom.cdx.json",
    "selftest",
    "selftest/inputs.npz",
]


@pytest.fixture(autouse=True)
def _no_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def bundle_path(tmp_path: Path, signing_key: Ed25519PrivateKey) -> Path:
    path = tmp_path / "built" / "digits-1.2.0-rpi4-cpu.edgepack"
    write_bundle(path, MEMBERS, MANIFEST, signing_key)
    return path


def _entries(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(bundle, "r:") as tar:
        return [(info, tar.extractfile(info).read() if info.isreg() else None) for info in tar.getmembers()]


def _write_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _replace_member(bundle: Path, out: Path, name: str, data: bytes) -> Path:
    entries = [(info, data if info.name == name else content) for info, content in _entries(bundle)]
    return _write_tar(out, entries)


def _extra_entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", data: bytes | None = b"evil\n"):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info, (data if kind == tarfile.REGTYPE else None)


def _flip_byte_in_member(bundle: Path, name: str, index: int = 10) -> None:
    with tarfile.open(bundle, "r:") as tar:
        offset = tar.getmember(name).offset_data
    with open(bundle, "r+b") as handle:
        handle.seek(offset + index)
        original = handle.read(1)
        handle.seek(offset + index)
        handle.write(bytes([original[0] ^ 0xFF]))


# --- canonical JSON ---------------------------------------------------------------------------------


def test_canonical_json_sorts_keys_without_spaces_and_keeps_unicode() -> None:
    assert canonical_json({"b": 1, "a": {"z": [1, 2], "y": "ü"}}) == '{"a":{"y":"ü","z":[1,2]},"b":1}'.encode()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_canonical_json_refuses_non_finite_numbers(bad: float) -> None:
    with pytest.raises(BundleError):
        canonical_json({"metric": bad})


# --- writing ----------------------------------------------------------------------------------------


def test_round_trip(bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    bundle = open_bundle(bundle_path, [signing_key.public_key()])

    assert bundle.key_id == key_id(signing_key.public_key())
    assert bundle.manifest.name == "digits"
    assert bundle.manifest.format == BUNDLE_FORMAT
    assert bundle.manifest.lineage.tools["note"] == "grüße"
    assert bundle.members == tuple(sorted(MEMBERS))
    for name, data in MEMBERS.items():
        assert bundle.read(name) == data

    dest = bundle.extract(tmp_path / "slot-a")

    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(
        [*MEMBERS, "manifest.json", "manifest.sig"]
    )
    for name, data in MEMBERS.items():
        assert (dest / name).read_bytes() == data
    assert json.loads((dest / "manifest.json").read_text("utf-8")) == bundle.manifest.to_json_dict()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_fills_files_and_leaves_callers_manifest_alone(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    manifest = json.loads(json.dumps(MANIFEST))

    info = write_bundle(tmp_path / "b.edgepack", MEMBERS, manifest, signing_key)

    assert manifest == MANIFEST
    assert info.manifest.format == BUNDLE_FORMAT
    assert info.manifest.files == {
        name: FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data)) for name, data in MEMBERS.items()
    }
    assert info.sha256 == hashlib.sha256(info.path.read_bytes()).hexdigest()
    assert info.size_bytes == info.path.stat().st_size


def test_layout_is_sorted_with_normalised_metadata(bundle_path: Path) -> None:
    entries = [info for info, _ in _entries(bundle_path)]

    assert [info.name for info in entries] == EXPECTED_ORDER
    for info in entries:
        assert (info.uid, info.gid, info.uname, info.gname, info.mtime) == (0, 0, "", "", 0)
        assert info.mode == (0o755 if info.isdir() else 0o644)
        assert info.isdir() or info.isreg()


def test_identical_inputs_give_byte_identical_bundles(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    reversed_members = dict(reversed(list(MEMBERS.items())))
    reordered_manifest = dict(reversed(list(MANIFEST.items())))

    first = write_bundle(tmp_path / "one" / "x.edgepack", MEMBERS, MANIFEST, signing_key)
    second = write_bundle(tmp_path / "two" / "deeper" / "x.edgepack", reversed_members, reordered_manifest, signing_key)

    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == second.sha256


def test_members_can_be_streamed_from_files(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(MEMBERS["model/model.onnx"])
    from_files = dict(MEMBERS, **{"model/model.onnx": model_file})

    from_bytes = write_bundle(tmp_path / "a.edgepack", MEMBERS, MANIFEST, signing_key)
    streamed = write_bundle(tmp_path / "b.edgepack", from_files, MANIFEST, signing_key)

    assert from_bytes.path.read_bytes() == streamed.path.read_bytes()


def test_source_date_epoch_sets_every_mtime(
    tmp_path: Path, signing_key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = write_bundle(tmp_path / "default.edgepack", MEMBERS, MANIFEST, signing_key)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")

    dated = write_bundle(tmp_path / "dated.edgepack", MEMBERS, MANIFEST, signing_key)
    again = write_bundle(tmp_path / "again.edgepack", MEMBERS, MANIFEST, signing_key)

    assert {info.mtime for info, _ in _entries(dated.path)} == {1700000000}
    assert {info.mtime for info, _ in _entries(default.path)} == {0}
    assert dated.path.read_bytes() == again.path.read_bytes() != default.path.read_bytes()


@pytest.mark.parametrize("value", ["yesterday", "-5", "1.5"])
def test_bad_source_date_epoch_is_a_config_error(
    tmp_path: Path, signing_key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)

    with pytest.raises(ConfigError, match="SOURCE_DATE_EPOCH"):
        write_bundle(tmp_path / "x.edgepack", MEMBERS, MANIFEST, signing_key)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil", "/etc/x", "model\\..\\evil", "model//x", "./model/x", "C:/x", ""])
def test_write_refuses_unsafe_member_names(tmp_path: Path, signing_key: Ed25519PrivateKey, name: str) -> None:
    with pytest.raises(UnsafeMemberError):
        write_bundle(tmp_path / "x.edgepack", {name: b"x"}, MANIFEST, signing_key)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("members", [{"manifest.json": b"{}"}, {"model": b"a", "model/x": b"b"}])
def test_write_refuses_reserved_or_clashing_names(tmp_path: Path, signing_key: Ed25519PrivateKey, members) -> None:
    with pytest.raises(BundleError):
        write_bundle(tmp_path / "x.edgepack", members, MANIFEST, signing_key)

    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_bundle_and_leaves_no_temp_file(
    bundle_path: Path, signing_key: Ed25519PrivateKey
) -> None:
    before = bundle_path.read_bytes()

    with pytest.raises(BundleError):
        write_bundle(bundle_path, MEMBERS, dict(MANIFEST, metrics={**MANIFEST["metrics"], "accuracy": float("nan")}), signing_key)

    assert bundle_path.read_bytes() == before
    assert [p.name for p in bundle_path.parent.iterdir()] == [bundle_path.name]


# --- tampering --------------------------------------------------------------------------------------


def test_rewritten_member_is_named(bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    original = MEMBERS["model/model.onnx"]
    same_size = bytes([original[0] ^ 1]) + original[1:]
    tampered = _replace_member(bundle_path, tmp_path / "tampered.edgepack", "model/model.onnx", same_size)

    with pytest.raises(IntegrityError, match=r"^model/model\.onnx: sha256 mismatch \(bundle tampered\?\)$") as excinfo:
        open_bundle(tampered, [signing_key.public_key()])

    assert excinfo.value.member == "model/model.onnx"


def test_resized_member_is_named(bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    tampered = _replace_member(bundle_path, tmp_path / "t.edgepack", "reference/stats.json", b'{"inputs":{}}')

    with pytest.raises(IntegrityError, match=r"^reference/stats\.json: size"):
        open_bundle(tampered, [signing_key.public_key()])


def test_byte_flipped_in_place_is_named(bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    _flip_byte_in_member(bundle_path, "selftest/inputs.npz")
    dest = tmp_path / "out"

    with pytest.raises(IntegrityError, match=r"^selftest/inputs\.npz: sha256 mismatch") as excinfo:
        open_bundle(bundle_path, [signing_key.public_key()]).extract(dest)

    assert excinfo.value.member == "selftest/inputs.npz"
    assert not dest.exists()


def test_edited_manifest_fails_the_signature(bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    manifest = json.loads(dict((i.name, d) for i, d in _entries(bundle_path))["manifest.json"])
    manifest["version"] = "9.9.9"
    tampered = _replace_member(bundle_path, tmp_path / "t.edgepack", "manifest.json", canonical_json(manifest))

    with pytest.raises(SignatureError, match="signature does not match manifest"):
        open_bundle(tampered, [signing_key.public_key()])


def test_byte_flipped_in_manifest_fails_the_signature(bundle_path: Path, signing_key: Ed25519PrivateKey) -> None:
    _flip_byte_in_member(bundle_path, "manifest.json", index=3)

    with pytest.raises(SignatureError):
        open_bundle(bundle_path, [signing_key.public_key()])


def test_bundle_from_another_key_is_refused(bundle_path: Path) -> None:
    stranger = Ed25519PrivateKey.generate().public_key()

    with pytest.raises(SignatureError, match="signed by unknown key"):
        open_bundle(bundle_path, [stranger])


def test_member_not_in_manifest_is_refused(bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    crafted = _write_tar(tmp_path / "extra.edgepack", _entries(bundle_path) + [_extra_entry("model/extra.bin")])

    with pytest.raises(IntegrityError, match=r"^model/extra\.bin: member not listed in the manifest"):
        open_bundle(crafted, [signing_key.public_key()])


def test_missing_listed_member_is_refused(bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    entries = [(info, data) for info, data in _entries(bundle_path) if info.name != "sbom.cdx.json"]
    crafted = _write_tar(tmp_path / "missing.edgepack", entries)

    with pytest.raises(IntegrityError, match=r"^sbom\.cdx\.json: listed in the manifest but missing"):
        open_bundle(crafted, [signing_key.public_key()])


def test_extra_directory_entry_is_allowed(bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    crafted = _write_tar(
        tmp_path / "dir.edgepack", _entries(bundle_path) + [_extra_entry("docs", tarfile.DIRTYPE, data=None)]
    )

    assert open_bundle(crafted, [signing_key.public_key()]).members == tuple(sorted(MEMBERS))


def _signed_bundle_with_manifest(path: Path, manifest_bytes: bytes, signing_key: Ed25519PrivateKey) -> Path:
    sig = canonical_json(sign_manifest(manifest_bytes, signing_key))
    entries = [_extra_entry("manifest.json", data=manifest_bytes), _extra_entry("manifest.sig", data=sig)]
    return _write_tar(path, entries)


def test_signed_manifest_with_duplicate_keys_is_refused(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    manifest_bytes = b'{"files":{},"format":"edgepack-bundle/1","version":"1","version":"2"}'
    crafted = _signed_bundle_with_manifest(tmp_path / "dup.edgepack", manifest_bytes, signing_key)

    with pytest.raises(BundleError, match="duplicate key"):
        open_bundle(crafted, [signing_key.public_key()])


def test_signed_manifest_of_another_format_is_refused(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    crafted = _signed_bundle_with_manifest(
        tmp_path / "fmt.edgepack", canonical_json({"files": {}, "format": "edgepack-bundle/99"}), signing_key
    )

    with pytest.raises(BundleError, match="unsupported bundle format"):
        open_bundle(crafted, [signing_key.public_key()])


# --- unsafe archives --------------------------------------------------------------------------------

UNSAFE_ENTRIES = {
    "dotdot": ("../evil", tarfile.REGTYPE, ""),
    "nested-dotdot": ("model/../../evil", tarfile.REGTYPE, ""),
    "absolute": ("/etc/x", tarfile.REGTYPE, ""),
    "backslash": ("..\\evil", tarfile.REGTYPE, ""),
    "symlink": ("model/link", tarfile.SYMTYPE, "/etc/passwd"),
    "symlink-dir": ("evil", tarfile.SYMTYPE, ".."),
    "hardlink": ("model/hard", tarfile.LNKTYPE, "model/model.onnx"),
    "fifo": ("model/pipe", tarfile.FIFOTYPE, ""),
    "device": ("model/dev", tarfile.CHRTYPE, ""),
    "duplicate": ("model/model.onnx", tarfile.REGTYPE, ""),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_ENTRIES))
def test_unsafe_member_is_refused_before_anything_is_written(
    bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path, case: str
) -> None:
    name, kind, linkname = UNSAFE_ENTRIES[case]
    crafted = _write_tar(tmp_path / "crafted.edgepack", _entries(bundle_path) + [_extra_entry(name, kind, linkname)])
    dest = tmp_path / "deep" / "out"
    dest.mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))

    with pytest.raises(UnsafeMemberError) as excinfo:
        open_bundle(crafted, [signing_key.public_key()]).extract(dest)
    for reader in (inspect_bundle, read_manifest_unverified):
        with pytest.raises(UnsafeMemberError):
            reader(crafted)

    assert name in str(excinfo.value)
    assert list(dest.iterdir()) == []
    assert sorted(tmp_path.rglob("*")) == before
    assert not (tmp_path / "deep" / "evil").exists()
    assert not (tmp_path / "evil").exists()


def test_unsafe_member_is_refused_even_when_signed(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    manifest = {"files": {"../evil": {"sha256": "0" * 64, "size": 1}}, "format": BUNDLE_FORMAT}
    crafted = _signed_bundle_with_manifest(tmp_path / "signed-evil.edgepack", canonical_json(manifest), signing_key)

    with pytest.raises(UnsafeMemberError, match=r"\.\./evil"):
        open_bundle(crafted, [signing_key.public_key()])


# --- not a bundle -----------------------------------------------------------------------------------


def test_not_a_tar_is_refused(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    junk = tmp_path / "junk.edgepack"
    junk.write_bytes(b"PK\x03\x04 definitely not a tar" * 40)

    with pytest.raises(BundleError, match="not an edgepack bundle"):
        open_bundle(junk, [signing_key.public_key()])


def test_compressed_bundle_is_refused(bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    gz = tmp_path / "b.edgepack.gz"
    gz.write_bytes(gzip.compress(bundle_path.read_bytes()))

    with pytest.raises(BundleError, match="not an edgepack bundle"):
        open_bundle(gz, [signing_key.public_key()])


def test_plain_tar_without_signature_is_refused(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    crafted = _write_tar(tmp_path / "plain.tar", [_extra_entry("manifest.json", data=b"{}")])

    with pytest.raises(BundleError, match=r"manifest\.sig missing"):
        open_bundle(crafted, [signing_key.public_key()])


def test_missing_file_is_a_config_error(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    with pytest.raises(ConfigError, match="bundle not found"):
        open_bundle(tmp_path / "nope.edgepack", [signing_key.public_key()])


# --- extraction and re-verification -----------------------------------------------------------------


def test_extract_refuses_a_non_empty_destination(
    bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    dest = tmp_path / "slot"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")

    with pytest.raises(ConfigError, match="not empty"):
        open_bundle(bundle_path, [signing_key.public_key()]).extract(dest)

    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_extract_into_existing_empty_folder(bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    dest = tmp_path / "slot"
    dest.mkdir()

    open_bundle(bundle_path, [signing_key.public_key()]).extract(dest)

    assert (dest / "model" / "model.onnx").read_bytes() == MEMBERS["model/model.onnx"]


def test_bundle_changed_after_verification_is_caught(
    bundle_path: Path, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    bundle = open_bundle(bundle_path, [signing_key.public_key()])
    _flip_byte_in_member(bundle_path, "model/model.onnx")
    dest = tmp_path / "slot"

    with pytest.raises(IntegrityError, match="model/model.onnx"):
        bundle.read("model/model.onnx")
    with pytest.raises(IntegrityError, match="model/model.onnx"):
        bundle.extract(dest)

    assert not dest.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".slot")] == []


def test_read_of_unknown_member_is_refused(bundle_path: Path, signing_key: Ed25519PrivateKey) -> None:
    with pytest.raises(BundleError, match="not a member"):
        open_bundle(bundle_path, [signing_key.public_key()]).read("model/other.onnx")


# --- inspection without a key -----------------------------------------------------------------------


def test_inspect_reports_manifest_and_member_status(bundle_path: Path, signing_key: Ed25519PrivateKey) -> None:
    clean = inspect_bundle(bundle_path)
    _flip_byte_in_member(bundle_path, "sbom.cdx.json", index=2)
    tampered = inspect_bundle(bundle_path)

    assert clean["manifest"]["name"] == "digits"
    assert clean["signature"]["key_id"] == key_id(signing_key.public_key())
    assert clean["size_bytes"] == bundle_path.stat().st_size
    assert {row["path"]: row["status"] for row in clean["files"]} == dict.fromkeys(MEMBERS, "ok")
    assert {row["path"]: row["status"] for row in tampered["files"]}["sbom.cdx.json"] == "sha256 mismatch"
    assert tampered["bundle_sha256"] == hashlib.sha256(bundle_path.read_bytes()).hexdigest()
    assert read_manifest_unverified(bundle_path).to_json_dict() == clean["manifest"]
    assert clean["manifest_problem"] is None


# --- the manifest's shape ---------------------------------------------------------------------------


def _signed_with(tmp_path: Path, signing_key: Ed25519PrivateKey, document: dict) -> Path:
    """A bundle whose (signed) manifest is `document` plus real members listed in it."""
    files = {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in MEMBERS.items()}
    manifest_bytes = canonical_json({**document, "format": BUNDLE_FORMAT, "files": files})
    path = _signed_bundle_with_manifest(tmp_path / "shape.edgepack", manifest_bytes, signing_key)
    with tarfile.open(path, "a", format=tarfile.GNU_FORMAT) as tar:
        for name, data in MEMBERS.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_signed_manifest_missing_a_field_is_refused_naming_it(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    document = manifest_content()
    del document["io"]["inputs"]
    crafted = _signed_with(tmp_path, signing_key, document)

    with pytest.raises(BundleError) as caught:
        open_bundle(crafted, [signing_key.public_key()])

    assert str(caught.value) == "manifest.json: field 'io.inputs' is missing"
    assert caught.value.field == "io.inputs"


def test_signed_manifest_with_a_wrong_type_is_refused_naming_it(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    document = manifest_content(metrics={**MANIFEST["metrics"], "accuracy": "high"})
    crafted = _signed_with(tmp_path, signing_key, document)

    with pytest.raises(BundleError, match=r"^manifest\.json: field 'metrics\.accuracy': Input should be a valid number.*'high'"):
        open_bundle(crafted, [signing_key.public_key()])
    with pytest.raises(BundleError, match=r"^manifest\.json: field 'metrics\.accuracy'"):
        read_manifest_unverified(crafted)


def test_signed_manifest_with_an_unknown_field_is_refused(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    crafted = _signed_with(tmp_path, signing_key, manifest_content(latency_ms={"p50": 1.0}))

    with pytest.raises(BundleError, match=r"^manifest\.json: unknown field 'latency_ms'$"):
        open_bundle(crafted, [signing_key.public_key()])


def test_manifest_without_schema_version_is_read_as_version_1(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    document = manifest_content()
    del document["schema_version"]

    assert open_bundle(_signed_with(tmp_path, signing_key, document), [signing_key.public_key()]).manifest.schema_version == 1


def test_manifest_of_a_later_schema_version_is_refused(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    crafted = _signed_with(tmp_path, signing_key, manifest_content(schema_version=2))

    with pytest.raises(BundleError, match=r"^manifest\.json: field 'schema_version': Input should be 1"):
        open_bundle(crafted, [signing_key.public_key()])


def test_inspect_still_describes_a_malformed_manifest(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    document = manifest_content()
    del document["lineage"]

    described = inspect_bundle(_signed_with(tmp_path, signing_key, document))

    assert described["manifest_problem"] == "manifest.json: field 'lineage' is missing"
    assert {row["path"]: row["status"] for row in described["files"]} == dict.fromkeys(MEMBERS, "ok")


def test_a_malformed_manifest_is_never_signed(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    with pytest.raises(BundleError, match=r"^manifest: field 'precision': Input should be 'fp32', 'fp16' or 'int8'"):
        write_bundle(tmp_path / "x.edgepack", MEMBERS, manifest_content(precision="int4"), signing_key)

    assert list(tmp_path.iterdir()) == []
