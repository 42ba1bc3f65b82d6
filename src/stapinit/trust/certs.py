"""Server identity: an ECDSA P-256 key and a self-signed X.509 certificate.

The certificate is what clients authorize (``stap-authorize-server-cert`` for TLS,
``stap-authorize-signing-cert`` for module signatures); it is named everywhere by its
fingerprint, ``SHA256:`` followed by the lowercase hex SHA-256 of its DER encoding.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stapinit.core.fsutil import atomic_write

#: Default validity of a generated certificate: five years (renewal is documented).
DEFAULT_DAYS = 5 * 365
FINGERPRINT_PREFIX = "SHA256:"


class CertificateError(Exception):
    """A certificate or key file cannot be used; ``str()`` is one line."""


@dataclass(frozen=True)
class CertificateDescription:
    """What a person needs to recognise a certificate."""

    subject: str
    fingerprint: str
    not_before: dt.datetime
    not_after: dt.datetime

    def __str__(self) -> str:
        return (
            f"subject {self.subject}, fingerprint {self.fingerprint}, "
            f"valid until {self.not_after:%Y-%m-%d %H:%M:%S} UTC"
        )


def fingerprint(cert: x509.Certificate) -> str:
    """Return ``SHA256:<hex>`` of the certificate's DER bytes."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def _validity_bound(cert: x509.Certificate, name: str) -> dt.datetime:
    # cryptography 42 added the aware ``*_utc`` properties; Debian 12 ships 38,
    # whose ``not_valid_before``/``not_valid_after`` are naive UTC datetimes.
    aware = getattr(cert, f"{name}_utc", None)
    if isinstance(aware, dt.datetime):
        return aware
    naive = getattr(cert, name)
    assert isinstance(naive, dt.datetime)
    return naive.replace(tzinfo=dt.UTC)


def not_valid_before(cert: x509.Certificate) -> dt.datetime:
    """Start of ``cert``'s validity, an aware UTC datetime (any cryptography >= 38)."""
    return _validity_bound(cert, "not_valid_before")


def not_valid_after(cert: x509.Certificate) -> dt.datetime:
    """End of ``cert``'s validity, an aware UTC datetime (any cryptography >= 38)."""
    return _validity_bound(cert, "not_valid_after")


def describe(cert: x509.Certificate) -> CertificateDescription:
    """Subject, fingerprint and validity period of ``cert``."""
    return CertificateDescription(
        subject=cert.subject.rfc4514_string(),
        fingerprint=fingerprint(cert),
        not_before=not_valid_before(cert),
        not_after=not_valid_after(cert),
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    """The PEM encoding of ``cert``."""
    return cert.public_bytes(serialization.Encoding.PEM)


def generate_identity(
    key_path: Path,
    cert_path: Path,
    common_name: str,
    days: int = DEFAULT_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a P-256 key (file mode 0600) and a self-signed certificate for it.

    The certificate names ``common_name``, ``localhost`` and ``127.0.0.1`` as
    subject alternative names, is valid from now for ``days`` days, and is written
    with mode 0644 since it is public.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stap-server"),
        ]
    )
    dns_names = dict.fromkeys([common_name, "localhost"])  # ordered, without duplicates
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in dns_names]
                + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 from the start: the key is never readable by others, not even briefly.
    key_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(key_path, key_pem, 0o600)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cert_path, certificate_pem(cert), 0o644)
    return key, cert


def load_certificate(path: Path) -> x509.Certificate:
    """Read one PEM (or DER) certificate; raises CertificateError with one line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read certificate: {exc.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise CertificateError(f"{path}: not an X.509 certificate") from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read the server's PEM private key; raises CertificateError with one line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{path}: cannot read private key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CertificateError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: not an elliptic-curve private key")
    return key


def key_matches(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    """Whether ``cert`` carries the public half of ``key``."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return key.public_key().public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt)
