"""Ed25519 keys and manifest signatures.

A bundle's `manifest.sig` is `{"alg": "ed25519", "key_id": …, "sig": base64}` over the exact bytes of
`manifest.json`. The key id is the first 16 hex characters of the sha256 of the raw 32-byte public key;
it only picks which trusted key to try, it is not itself trusted.

Keys are PEM files: `edgepack.key` (PKCS8, unencrypted, mode 0600) and `edgepack.pub`
(SubjectPublicKeyInfo). `resolve_signing_key` decides which private key a build signs with.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgepack.errors import ConfigError, SignatureError

PRIVATE_KEY_NAME = "edgepack.key"
PUBLIC_KEY_NAME = "edgepack.pub"
SIGNATURE_ALG = "ed25519"
SIGNING_KEY_ENV = "EDGEPACK_SIGNING_KEY"

__all__ = [
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "SIGNATURE_ALG",
    "SIGNING_KEY_ENV",
    "decode_public_key",
    "dev_key_path",
    "encode_public_key",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "resolve_signing_key",
    "sign_manifest",
    "verify_manifest_signature",
]


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Write `edgepack.key` (mode 0600) and `edgepack.pub` into `directory`; never overwrite either."""
    directory = Path(directory)
    private_path = directory / PRIVATE_KEY_NAME
    public_path = directory / PUBLIC_KEY_NAME
    for existing in (private_path, public_path):
        if existing.exists() or existing.is_symlink():
            raise ConfigError(f"{existing} already exists; refusing to overwrite a key", path=existing)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create key folder {directory}: {exc.strerror or exc}", path=directory) from exc

    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    # O_EXCL makes "never overwrite" hold even against a concurrent writer; the mode is set at
    # creation so the private key is never readable by others, not even for a moment.
    _write_new_file(private_path, private_pem, 0o600)
    try:
        _write_new_file(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise ConfigError(f"{path} already exists; refusing to overwrite a key", path=path) from exc
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}", path=path) from exc
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or (for 0644) kept the bits; be exact
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


def _read_key_file(path: Path, what: str) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} not found: {path}", path=path) from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{what} {path} is a folder, not a key file", path=path) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}", path=path) from exc


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an unencrypted PEM (PKCS8) Ed25519 private key; ConfigError if missing or not one."""
    path = Path(path)
    data = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        # cryptography raises TypeError when the PEM is encrypted and no password was given.
        raise ConfigError(f"signing key {path} is encrypted; edgepack needs an unencrypted key", path=path) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not a PEM Ed25519 private key", path=path) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is a {type(key).__name__}, not an Ed25519 private key", path=path)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a PEM Ed25519 public key; ConfigError if missing or not one."""
    path = Path(path)
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not a PEM Ed25519 public key", path=path) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is a {type(key).__name__}, not an Ed25519 public key", path=path)
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of sha256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def encode_public_key(public_key: Ed25519PublicKey) -> str:
    """Base64 of the raw 32-byte public key (how the fleet hands its director key to devices)."""
    raw = public_key.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def decode_public_key(encoded: str) -> Ed25519PublicKey:
    """The key `encode_public_key` wrote; ValueError when it is not base64 of 32 bytes."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("public key is not valid base64") from None
    if len(raw) != 32:
        raise ValueError(f"public key is {len(raw)} bytes; an Ed25519 public key is 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def sign_manifest(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> dict:
    """Sign the exact manifest bytes; returns the `manifest.sig` document."""
    signature = private_key.sign(bytes(manifest_bytes))
    return {
        "alg": SIGNATURE_ALG,
        "key_id": key_id(private_key.public_key()),
        "sig": base64.b64encode(signature).decode("ascii"),
    }


def verify_manifest_signature(
    manifest_bytes: bytes, sig_doc: dict, trusted_keys: list[Ed25519PublicKey]
) -> str:
    """Check `sig_doc` over `manifest_bytes` against the trusted keys; return the signer's key id.

    Raises SignatureError naming the problem: a malformed document, an unsupported alg, a key that
    is not trusted, or a signature that does not match the manifest.
    """
    if not isinstance(sig_doc, dict):
        raise SignatureError("manifest.sig is not a JSON object")
    alg = sig_doc.get("alg")
    if alg != SIGNATURE_ALG:
        raise SignatureError(f"unsupported alg {alg!r} in manifest.sig (expected {SIGNATURE_ALG!r})")
    signer_id = sig_doc.get("key_id")
    if not isinstance(signer_id, str) or not signer_id:
        raise SignatureError("manifest.sig has no key_id")
    encoded = sig_doc.get("sig")
    if not isinstance(encoded, str):
        raise SignatureError("manifest.sig has no sig")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("manifest.sig: sig is not valid base64") from exc

    if not trusted_keys:
        raise SignatureError(f"signed by unknown key {signer_id} (no trusted keys given)", key_id=signer_id)
    trusted = {key_id(key): key for key in trusted_keys}
    public_key = trusted.get(signer_id)
    if public_key is None:
        known = ", ".join(sorted(trusted))
        raise SignatureError(f"signed by unknown key {signer_id} (trusted: {known})", key_id=signer_id)
    try:
        public_key.verify(signature, bytes(manifest_bytes))
    except InvalidSignature as exc:
        raise SignatureError(
            f"signature does not match manifest (key {signer_id}; bundle tampered?)", key_id=signer_id
        ) from exc
    return signer_id


def dev_key_path() -> Path:
    """Where the development signing key lives: $XDG_CONFIG_HOME (or ~/.config)/edgepack/dev-key/."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "edgepack" / "dev-key" / PRIVATE_KEY_NAME


def resolve_signing_key(explicit: Path | None) -> tuple[Ed25519PrivateKey, Path, bool]:
    """Pick the key a build signs with; returns (key, its path, whether it is the development key).

    Order: `explicit`, then $EDGEPACK_SIGNING_KEY, then ./keys/edgepack.key, else the development key
    under the user's config folder, created on first use. A key that is named (explicitly or by the
    variable) but missing is an error, never a silent fall-through to the development key.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        return load_private_key(path), path, False
    from_env = os.environ.get(SIGNING_KEY_ENV)
    if from_env:
        path = Path(from_env).expanduser()
        return load_private_key(path), path, False
    project_key = Path.cwd() / "keys" / PRIVATE_KEY_NAME
    if project_key.exists():
        return load_private_key(project_key), project_key, False

    dev_path = dev_key_path()
    if not dev_path.exists():
        dev_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            generate_keypair(dev_path.parent)
        except ConfigError:
            # Another process created it between our check and our write; use theirs.
            if not dev_path.exists():
                raise
    return load_private_key(dev_path), dev_path, True
