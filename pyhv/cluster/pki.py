"""The cluster's certificates (`pyhv cluster init DIR`, `pyhv cluster add-host NAME --ca DIR`):
a cluster CA, and for each host a certificate signed by it, good both as a TLS server's (its
VMMS API, its incoming migrations) and as a client's (its calls to other hosts), so hosts speak
mutual TLS to each other and a certificate from any other CA is refused at the handshake.

    DIR/ca.pem, DIR/ca.key       the cluster CA (the key readable by its owner only)
    DIR/NAME.pem, DIR/NAME.key   host NAME's certificate and key

A host serves with `pyhv vmms serve --tls-cert DIR/NAME.pem --tls-key DIR/NAME.key
--tls-client-ca DIR/ca.pem`; it publishes its certificate's SHA-256 in its host record.
Made with `cryptography` (ECDSA P-256, SHA-256)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pyhv.cluster.records import check_host_name

CA_DAYS = 3650
HOST_DAYS = 825


class PkiError(RuntimeError):
    """The CA or a certificate could not be made or read: the message says what to do."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init(directory: Path, name: str = "pyhv cluster CA") -> Path:
    """A new cluster CA in `directory` (created); its certificate's path. Refused if the
    directory holds a CA already (its hosts' certificates would no longer verify)."""
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() or key_path.exists():
        raise PkiError(f"{directory} holds a cluster CA already: use it, or pick another DIR")
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as e:
        raise PkiError(f"cannot make the cluster CA in {directory}: {e}") from None
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as e:
        raise PkiError(
            f"no cluster CA in {directory} ({e}): make one with `pyhv cluster init {directory}`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{directory / 'ca.key'} is not the EC key `pyhv cluster init` makes")
    return cert, key


def add_host(directory: Path, name: str, addresses: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Host `name`'s certificate, signed by the CA in `directory`, for the names and IP
    addresses other hosts reach it at (`name`, localhost and 127.0.0.1, plus `addresses`):
    (certificate, key) paths."""
    try:
        check_host_name(name)
        ips = [ipaddress.ip_address(a) for a in ("127.0.0.1", *addresses)]
    except ValueError as e:
        raise PkiError(str(e)) from None
    ca_cert, ca_key = _load_ca(directory)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if cert_path.exists() or key_path.exists():
        raise PkiError(f"{cert_path} exists: host {name} has a certificate already")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    dns = sorted({name, "localhost"})
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=HOST_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    *(x509.DNSName(d) for d in dns),
                    *(x509.IPAddress(ip) for ip in dict.fromkeys(ips)),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    try:
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as e:
        raise PkiError(f"cannot write host {name}'s certificate in {directory}: {e}") from None
    return cert_path, key_path


def fingerprint(cert_path: Path) -> str:
    """A certificate's SHA-256 (hex, of its DER), as host records publish it."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as e:
        raise PkiError(f"cannot read the certificate {cert_path}: {e}") from None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
