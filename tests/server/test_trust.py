"""Certificates, fingerprints and detached module signatures."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stapinit.trust.certs import (
    CertificateError,
    describe,
    fingerprint,
    generate_identity,
    key_matches,
    load_certificate,
    load_private_key,
    not_valid_before,
)
from stapinit.trust.signing import FORMAT, SignatureError, sign_module, verify_module

Ident = tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]
MODULE = b"\x7fELF" + bytes(range(256)) * 4


@pytest.fixture(scope="module")
def identity(
    tmp_path_factory: pytest.TempPathFactory,
) -> Ident:
    d = tmp_path_factory.mktemp("id")
    key, cert = generate_identity(d / "stap.key", d / "stap.cert", "build.example", days=30)
    return key, cert, d


def test_generated_identity(
    identity: Ident,
) -> None:
    key, cert, d = identity
    assert (d / "stap.key").stat().st_mode & 0o777 == 0o600
    assert (d / "stap.cert").stat().st_mode & 0o777 == 0o644
    assert isinstance(key.curve, ec.SECP256R1)
    assert key_matches(load_private_key(d / "stap.key"), cert)
    loaded = load_certificate(d / "stap.cert")
    assert loaded == cert
    der = cert.public_bytes(serialization.Encoding.DER)
    assert fingerprint(cert) == "SHA256:" + hashlib.sha256(der).hexdigest()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["build.example", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    info = describe(cert)
    assert (
        info.subject.startswith("O=stap-server,CN=build.example")
        or "CN=build.example" in info.subject
    )
    assert info.fingerprint == fingerprint(cert)
    assert dt.timedelta(days=29) < info.not_after - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)
    assert info.fingerprint in str(info)


def test_der_certificate_loads(identity: Ident, tmp_path: Path) -> None:
    _, cert, _ = identity
    (tmp_path / "c.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    assert load_certificate(tmp_path / "c.der") == cert


def test_non_certificates_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk").write_text("hello")
    with pytest.raises(CertificateError, match=r"not an X\.509 certificate"):
        load_certificate(tmp_path / "junk")
    with pytest.raises(CertificateError, match="cannot read certificate"):
        load_certificate(tmp_path / "missing")
    with pytest.raises(CertificateError, match="not an unencrypted PEM private key"):
        load_private_key(tmp_path / "junk")


def _signed_at(cert: x509.Certificate) -> dt.datetime:
    """A signing time within the identity's validity, however late the test runs."""
    return not_valid_before(cert).replace(microsecond=0) + dt.timedelta(minutes=1)


def _sign(identity: Ident) -> bytes:
    key, cert, _ = identity
    return sign_module(
        key,
        cert,
        MODULE,
        "hello.bo",
        "6.1.0",
        "x86_64",
        "stapusr",
        signed_at=_signed_at(cert),
        source="ab" * 32,
    )


def test_signature_verifies_and_carries_the_manifest(
    identity: Ident,
) -> None:
    sgn = _sign(identity)
    doc = json.loads(sgn)
    assert doc["format"] == FORMAT
    manifest = verify_module(sgn, MODULE, [identity[1]])
    assert manifest.module_sha256 == hashlib.sha256(MODULE).hexdigest()
    assert (manifest.module_name, manifest.release, manifest.arch, manifest.privilege) == (
        "hello.bo",
        "6.1.0",
        "x86_64",
        "stapusr",
    )
    assert manifest.signer_fingerprint == fingerprint(identity[1])
    assert manifest.signed_at == _signed_at(identity[1]).strftime("%Y-%m-%dT%H:%M:%SZ")


def _reason(sgn: bytes, module: bytes, trusted: list[x509.Certificate]) -> str:
    with pytest.raises(SignatureError) as err:
        verify_module(sgn, module, trusted)
    assert "\n" not in str(err.value)
    return err.value.reason


def test_every_kind_of_tampering_is_named(identity: Ident, tmp_path: Path) -> None:
    sgn = _sign(identity)
    cert = identity[1]
    flipped = bytearray(MODULE)
    flipped[100] ^= 0x80
    assert _reason(sgn, bytes(flipped), [cert]) == "module-altered"

    for field, value in (("release", "6.2.0"), ("privilege", "stapdev"), ("module_name", "x.bo")):
        doc = json.loads(sgn)
        doc["manifest"][field] = value
        assert _reason(json.dumps(doc).encode(), MODULE, [cert]) == "bad-signature"

    doc = json.loads(sgn)
    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[10] ^= 0x01
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    assert _reason(json.dumps(doc).encode(), MODULE, [cert]) == "bad-signature"

    _, other = generate_identity(tmp_path / "k", tmp_path / "c", "other")
    assert _reason(sgn, MODULE, [other]) == "untrusted-signer"
    assert _reason(sgn, MODULE, []) == "untrusted-signer"

    for junk in (b"", b"not json", b"[]", b'{"format": "x"}', sgn.replace(b'"arch"', b'"arc"')):
        assert _reason(junk, MODULE, [cert]) == "malformed"
