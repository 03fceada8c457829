"""Keys and manifest signatures, on real key files."""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from edgepack.errors import ConfigError, SignatureError
from edgepack.signing import (
    dev_key_path,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    resolve_signing_key,
    sign_manifest,
    verify_manifest_signature,
)

MANIFEST = b'{"name":"digits","version":"1.0.0"}'


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder and config home of this test's own; no signing key in the environment."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("EDGEPACK_SIGNING_KEY", raising=False)
    return work


def test_generate_keypair_writes_pem_files_with_private_mode_0600(tmp_path: Path) -> None:
    private_path, public_path = generate_keypair(tmp_path / "keys")

    assert private_path == tmp_path / "keys" / "edgepack.key"
    assert public_path == tmp_path / "keys" / "edgepack.pub"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private_key = load_private_key(private_path)
    assert key_id(private_key.public_key()) == key_id(load_public_key(public_path))


def test_generate_keypair_refuses_to_overwrite(tmp_path: Path) -> None:
    private_path, _ = generate_keypair(tmp_path)
    before = private_path.read_bytes()

    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(tmp_path)

    assert private_path.read_bytes() == before


def test_key_id_is_sha256_prefix_of_raw_public_key() -> None:
    public_key = Ed25519PrivateKey.generate().public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    assert key_id(public_key) == hashlib.sha256(raw).hexdigest()[:16]


@pytest.mark.parametrize("loader", [load_private_key, load_public_key])
def test_loading_a_missing_key_is_a_config_error(tmp_path: Path, loader) -> None:
    with pytest.raises(ConfigError, match="not found"):
        loader(tmp_path / "nope.pem")


@pytest.mark.parametrize("loader", [load_private_key, load_public_key])
def test_loading_garbage_is_a_one_line_config_error(tmp_path: Path, loader) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"this is not a key\n")

    with pytest.raises(ConfigError) as excinfo:
        loader(garbage)

    assert "\n" not in str(excinfo.value)
    assert str(garbage) in str(excinfo.value)


def test_loading_an_rsa_key_is_refused(tmp_path: Path) -> None:
    rsa_path = tmp_path / "rsa.pem"
    rsa_path.write_bytes(
        generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    with pytest.raises(ConfigError, match="not an Ed25519"):
        load_private_key(rsa_path)


def test_loading_a_public_key_as_private_is_refused(tmp_path: Path) -> None:
    _, public_path = generate_keypair(tmp_path)

    with pytest.raises(ConfigError):
        load_private_key(public_path)


def test_sign_and_verify_round_trip() -> None:
    private_key = Ed25519PrivateKey.generate()

    sig_doc = sign_manifest(MANIFEST, private_key)

    assert sig_doc["alg"] == "ed25519"
    assert sig_doc["key_id"] == key_id(private_key.public_key())
    assert len(base64.b64decode(sig_doc["sig"])) == 64
    other = Ed25519PrivateKey.generate().public_key()
    assert verify_manifest_signature(MANIFEST, sig_doc, [other, private_key.public_key()]) == sig_doc["key_id"]


def test_verify_rejects_edited_manifest() -> None:
    private_key = Ed25519PrivateKey.generate()
    sig_doc = sign_manifest(MANIFEST, private_key)

    with pytest.raises(SignatureError, match="signature does not match manifest"):
        verify_manifest_signature(MANIFEST.replace(b"1.0.0", b"1.0.1"), sig_doc, [private_key.public_key()])


def test_verify_rejects_unknown_key() -> None:
    signer = Ed25519PrivateKey.generate()
    trusted = Ed25519PrivateKey.generate().public_key()
    sig_doc = sign_manifest(MANIFEST, signer)

    with pytest.raises(SignatureError, match=f"signed by unknown key {sig_doc['key_id']}"):
        verify_manifest_signature(MANIFEST, sig_doc, [trusted])


def test_verify_rejects_forged_key_id() -> None:
    attacker = Ed25519PrivateKey.generate()
    trusted = Ed25519PrivateKey.generate().public_key()
    sig_doc = sign_manifest(MANIFEST, attacker) | {"key_id": key_id(trusted)}

    with pytest.raises(SignatureError, match="signature does not match manifest"):
        verify_manifest_signature(MANIFEST, sig_doc, [trusted])


def test_verify_rejects_unsupported_alg_and_malformed_docs() -> None:
    private_key = Ed25519PrivateKey.generate()
    sig_doc = sign_manifest(MANIFEST, private_key)
    trusted = [private_key.public_key()]

    with pytest.raises(SignatureError, match="unsupported alg"):
        verify_manifest_signature(MANIFEST, sig_doc | {"alg": "rsa"}, trusted)
    with pytest.raises(SignatureError, match="base64"):
        verify_manifest_signature(MANIFEST, sig_doc | {"sig": "!!not base64!!"}, trusted)
    with pytest.raises(SignatureError, match="key_id"):
        verify_manifest_signature(MANIFEST, {k: v for k, v in sig_doc.items() if k != "key_id"}, trusted)
    with pytest.raises(SignatureError):
        verify_manifest_signature(MANIFEST, ["not", "a", "dict"], trusted)  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match="no trusted keys"):
        verify_manifest_signature(MANIFEST, sig_doc, [])


def test_resolve_prefers_explicit_path(isolated_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit_private, _ = generate_keypair(tmp_path / "explicit")
    env_private, _ = generate_keypair(tmp_path / "env")
    generate_keypair(isolated_env / "keys")
    monkeypatch.setenv("EDGEPACK_SIGNING_KEY", str(env_private))

    key, path, is_dev = resolve_signing_key(explicit_private)

    assert (path, is_dev) == (explicit_private, False)
    assert key_id(key.public_key()) == key_id(load_private_key(explicit_private).public_key())


def test_resolve_uses_env_before_project_keys(
    isolated_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_private, _ = generate_keypair(tmp_path / "env")
    generate_keypair(isolated_env / "keys")
    monkeypatch.setenv("EDGEPACK_SIGNING_KEY", str(env_private))

    _, path, is_dev = resolve_signing_key(None)

    assert (path, is_dev) == (env_private, False)


def test_resolve_env_pointing_nowhere_is_an_error(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPACK_SIGNING_KEY", str(isolated_env / "missing.key"))

    with pytest.raises(ConfigError, match="not found"):
        resolve_signing_key(None)
    assert not dev_key_path().exists()


def test_resolve_uses_project_keys_folder(isolated_env: Path) -> None:
    project_private, _ = generate_keypair(isolated_env / "keys")

    _, path, is_dev = resolve_signing_key(None)

    assert path.resolve() == project_private.resolve()
    assert is_dev is False


def test_resolve_creates_then_reuses_dev_key(isolated_env: Path, tmp_path: Path) -> None:
    first_key, first_path, first_is_dev = resolve_signing_key(None)
    second_key, second_path, second_is_dev = resolve_signing_key(None)

    assert first_path == tmp_path / "config" / "edgepack" / "dev-key" / "edgepack.key"
    assert first_is_dev and second_is_dev
    assert second_path == first_path
    assert key_id(first_key.public_key()) == key_id(second_key.public_key())
    assert stat.S_IMODE(first_path.stat().st_mode) == 0o600
    assert (first_path.parent / "edgepack.pub").exists()
