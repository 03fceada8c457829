"""`edgepack keys generate`, `edgepack bundle verify` and `edgepack bundle inspect`, run as real processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgepack.bundle import write_bundle
from edgepack.signing import generate_keypair, key_id, load_private_key, load_public_key
from tests.edgepack.samples import manifest_content

MEMBERS = {
    "model/model.onnx": b"\x08\x07onnx-model-bytes" * 32,
    "reference/stats.json": b'{"outputs":{"bins":[0.2,0.8]}}',
    "sbom.cdx.json": b'{"bomFormat":"CycloneDX"}',
}
MANIFEST = manifest_content()


def run_edgepack(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_CONFIG_HOME=str(cwd / "config"), COLUMNS="200", NO_COLOR="1")
    env.pop("EDGEPACK_SIGNING_KEY", None)
    env.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def signed_bundle(tmp_path: Path) -> tuple[Path, Path]:
    """A bundle and the public key that signed it."""
    private_path, public_path = generate_keypair(tmp_path / "keys")
    bundle_path = tmp_path / "digits-1.2.0-rpi4-cpu.edgepack"
    write_bundle(bundle_path, MEMBERS, MANIFEST, load_private_key(private_path))
    return bundle_path, public_path


def test_keys_generate_writes_private_key_0600(tmp_path: Path) -> None:
    result = run_edgepack("keys", "generate", "mykeys", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    private_path = tmp_path / "mykeys" / "edgepack.key"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    signer_id = key_id(load_public_key(tmp_path / "mykeys" / "edgepack.pub"))
    assert signer_id in result.stdout
    assert "edgepack.key" in result.stdout and "edgepack.pub" in result.stdout


def test_keys_generate_json(tmp_path: Path) -> None:
    result = run_edgepack("keys", "generate", "k", "--json", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["key_id"] == key_id(load_private_key(tmp_path / document["private_key"]).public_key())
    assert Path(document["public_key"]).name == "edgepack.pub"


def test_keys_generate_refuses_to_overwrite_with_exit_2(tmp_path: Path) -> None:
    assert run_edgepack("keys", "generate", "k", cwd=tmp_path).returncode == 0
    before = (tmp_path / "k" / "edgepack.key").read_bytes()

    result = run_edgepack("keys", "generate", "k", cwd=tmp_path)

    assert result.returncode == 2
    assert "already exists" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "k" / "edgepack.key").read_bytes() == before


def test_verify_good_bundle_exits_0(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    bundle_path, public_path = signed_bundle
    other_public = generate_keypair(tmp_path / "other")[1]

    result = run_edgepack(
        "bundle", "verify", str(bundle_path), "--trusted-key", str(other_public), "--trusted-key", str(public_path),
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"OK: digits 1.2.0 rpi4-cpu, signed by {key_id(load_public_key(public_path))}"


def test_verify_tampered_bundle_exits_1_naming_the_member(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    bundle_path, public_path = signed_bundle
    with tarfile.open(bundle_path, "r:") as tar:
        offset = tar.getmember("reference/stats.json").offset_data
    data = bytearray(bundle_path.read_bytes())
    data[offset + 1] ^= 0x20
    bundle_path.write_bytes(bytes(data))

    result = run_edgepack("bundle", "verify", str(bundle_path), "--trusted-key", str(public_path), cwd=tmp_path)

    assert result.returncode == 1
    assert "reference/stats.json: sha256 mismatch" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_verify_with_untrusted_key_exits_1(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    bundle_path, _ = signed_bundle
    other_public = generate_keypair(tmp_path / "other")[1]

    result = run_edgepack("bundle", "verify", str(bundle_path), "--trusted-key", str(other_public), cwd=tmp_path)

    assert result.returncode == 1
    assert "signed by unknown key" in result.stderr


def test_verify_with_missing_key_file_exits_2(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    bundle_path, _ = signed_bundle

    result = run_edgepack("bundle", "verify", str(bundle_path), "--trusted-key", "nope.pub", cwd=tmp_path)

    assert result.returncode == 2
    assert "nope.pub" in result.stderr


def test_verify_non_bundle_exits_1_naming_the_file(tmp_path: Path, signed_bundle: tuple[Path, Path]) -> None:
    _, public_path = signed_bundle
    junk = tmp_path / "junk.edgepack"
    junk.write_text("hello")

    result = run_edgepack("bundle", "verify", str(junk), "--trusted-key", str(public_path), cwd=tmp_path)

    assert result.returncode == 1
    assert "junk.edgepack: not an edgepack bundle" in result.stderr


def test_inspect_prints_fields_and_files(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    bundle_path, public_path = signed_bundle

    result = run_edgepack("bundle", "inspect", str(bundle_path), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    signer_id = key_id(load_public_key(public_path))
    for text in ("digits", "1.2.0", "rpi4-cpu", "model/model.onnx", "sbom.cdx.json", signer_id):
        assert text in result.stdout


def test_inspect_json_is_manifest_plus_bundle_facts(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    bundle_path, _ = signed_bundle

    result = run_edgepack("bundle", "inspect", str(bundle_path), "--json", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["name"] == "digits"
    assert sorted(document["files"]) == sorted(MEMBERS)
    assert document["size_bytes"] == bundle_path.stat().st_size
    assert len(document["bundle_sha256"]) == 64


def test_inspect_refuses_unsafe_bundle(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    bundle_path, _ = signed_bundle
    crafted = tmp_path / "crafted.edgepack"
    crafted.write_bytes(bundle_path.read_bytes())
    with tarfile.open(crafted, "a") as tar:
        link = tarfile.TarInfo("model/escape")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)

    result = run_edgepack("bundle", "inspect", str(crafted), cwd=tmp_path)

    assert result.returncode == 1
    assert "model/escape" in result.stderr
