"""A lab certificate authority for trials: one CA, server certificates for the fleet and the broker, client certificates.

    DIR/ca.pem  ca.key            create_lab_ca(DIR)                          the CA agents and the fleet trust
    DIR/NAME.pem  NAME.key        issue_certificate(DIR, NAME, sans=[...])    a server (or --client) certificate

Server certificates always carry the SANs 127.0.0.1 and localhost (loopback trials) plus the names given (an IP
address becomes an IP SAN, anything else a DNS SAN). Keys are ECDSA P-256 (small, fast handshakes on small devices),
private keys are written 0600. Everything is made with `cryptography`: no openssl CLI. The certificates carry what
strict verifiers (OpenSSL 3, Python 3.13's VERIFY_X509_STRICT) insist on: a critical basicConstraints, key usage,
extended key usage, subject and authority key identifiers.

This is for trials and tests. In production use certificates from your own PKI: point the fleet's --tls-cert/--tls-key,
the broker's listener and the agents' `ca_file` at them; nothing here is needed then.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgepack.errors import ConfigError
from edgepack.files import atomic_write

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"
LOOPBACK_SANS = ("127.0.0.1", "localhost")
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity browsers and most TLS stacks accept for a leaf certificate


@dataclass(frozen=True)
class IssuedCertificate:
    """Where a certificate and its key were written, and the names it is valid for."""

    cert: Path
    key: Path
    sans: tuple[str, ...]


def create_lab_ca(directory: Path, common_name: str = "edgepack lab CA", days: int = CA_DAYS) -> IssuedCertificate:
    """Write DIR/ca.pem and DIR/ca.key (0600); never overwrites an existing CA."""
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    _refuse_overwrite(cert_path, key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a device clock slightly behind
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(cert_path, key_path, cert, key)
    return IssuedCertificate(cert=cert_path, key=key_path, sans=())


def issue_certificate(directory: Path, name: str, sans: list[str] | tuple[str, ...] = (), *, client: bool = False,
                      loopback: bool = True, days: int = LEAF_DAYS) -> IssuedCertificate:
    """Write DIR/NAME.pem and DIR/NAME.key, signed by the lab CA in DIR.

    A server certificate is valid for 127.0.0.1, localhost (unless `loopback=False`) and `sans`; a client certificate (`client=True`)
    names `name` as its common name (and carries `sans` if given)."""
    directory = Path(directory)
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"certificate name {name!r}: use a plain file name such as 'fleet' or 'broker'")
    if name == Path(CA_CERT_NAME).stem:
        raise ConfigError("certificate name 'ca' is the CA's own; pick another")
    ca_cert, ca_key = load_ca(directory)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _refuse_overwrite(cert_path, key_path)
    all_sans = tuple(dict.fromkeys([*(LOOPBACK_SANS if loopback and not client else ()), *sans]))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if all_sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(san) for san in all_sans]), critical=False)
    _write_pair(cert_path, key_path, builder.sign(ca_key, hashes.SHA256()), key)
    return IssuedCertificate(cert=cert_path, key=key_path, sans=all_sans)


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The lab CA's certificate and key from DIR; one ConfigError line if they are missing or unreadable."""
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    if not cert_path.is_file() or not key_path.is_file():
        raise ConfigError(f"no lab CA in {directory} (expected {CA_CERT_NAME} and {CA_KEY_NAME}; "
                          f"create one with `edgepack certs lab-ca {directory}`)", path=str(directory))
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"lab CA in {directory} cannot be read: {exc}", path=str(directory)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"lab CA key {key_path} is not an EC key (it was not made by `edgepack certs lab-ca`)")
    return cert, key


def mosquitto_tls_config(cafile: Path, certfile: Path, keyfile: Path, *, require_certificate: bool = False) -> str:
    """The lines that make the Mosquitto listener above them a TLS one (mqtts://); with `require_certificate`
    clients must present a certificate the CA issued (their MQTT username still comes from CONNECT)."""
    return (f"cafile {cafile}\ncertfile {certfile}\nkeyfile {keyfile}\n"
            f"require_certificate {'true' if require_certificate else 'false'}\n"
            "tls_version tlsv1.2\n")  # the oldest version accepted; TLS 1.3 is negotiated when both sides have it


def describe(path: Path) -> dict[str, object]:
    """Subject, SANs and expiry of a PEM certificate (what `edgepack certs` prints)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(entry.value) for entry in san]
    except x509.ExtensionNotFound:
        sans = []
    return {"path": str(path), "subject": cert.subject.rfc4514_string(), "sans": sans,
            "not_after": cert.not_valid_after_utc.isoformat(), "sha256": cert.fingerprint(hashes.SHA256()).hex()}


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        pass
    if not san or any(ch.isspace() for ch in san):
        raise ConfigError(f"subject alternative name {san!r} is neither an IP address nor a DNS name")
    return x509.DNSName(san)


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    try:
        atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), mode=0o600)
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise ConfigError(f"cannot write {cert_path}: {exc.strerror or exc}", path=str(cert_path)) from None


def _refuse_overwrite(*paths: Path) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} already exists; refusing to overwrite it", path=str(path))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


__all__ = ["CA_CERT_NAME", "CA_KEY_NAME", "LOOPBACK_SANS", "IssuedCertificate", "create_lab_ca", "describe",
           "issue_certificate", "load_ca", "mosquitto_tls_config"]
