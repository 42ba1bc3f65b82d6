"""Module signatures: what verifies, and why the rest does not."""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import asdict, replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from stapinit.trust.signing import (
    FORMAT,
    Manifest,
    SignatureError,
    sign_module,
    verify_module,
)
from tests.trust.signers import make_signer

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)
MODULE = b"\x7fELF module bytes"


def sign(
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    signed_at: dt.datetime,
    module: bytes = MODULE,
) -> bytes:
    return sign_module(
        key,
        cert,
        module,
        "hello.bo",
        "6.1.0",
        "x86_64",
        "stapusr",
        signed_at=signed_at,
        source="ab" * 32,
    )


def test_a_signature_within_the_signers_validity_verifies() -> None:
    key, cert = make_signer(NOW - DAY, NOW + 365 * DAY)
    manifest = verify_module(sign(key, cert, NOW), MODULE, [cert])
    assert (manifest.module_name, manifest.privilege) == ("hello.bo", "stapusr")


def test_a_certificate_valid_only_in_the_past_no_longer_vouches() -> None:
    # Signed while the certificate was valid; it has expired since.
    key, cert = make_signer(NOW - 730 * DAY, NOW - 365 * DAY)
    sgn = sign(key, cert, NOW - 500 * DAY)
    with pytest.raises(SignatureError, match="the signer's certificate has expired") as info:
        verify_module(sgn, MODULE, [cert])
    assert info.value.reason == "signer-expired"
    assert "\n" not in str(info.value)
    # The same signature was good while the certificate was.
    assert verify_module(sgn, MODULE, [cert], now=NOW - 400 * DAY).module_name == "hello.bo"


def test_a_signature_made_outside_the_validity_is_refused_even_now() -> None:
    key, cert = make_signer(NOW - DAY, NOW + 365 * DAY)
    before = sign(key, cert, NOW - 30 * DAY)
    with pytest.raises(SignatureError, match="before the signer's certificate became valid") as e:
        verify_module(before, MODULE, [cert])
    assert e.value.reason == "signer-not-yet-valid"
    after = sign(key, cert, NOW + 400 * DAY)
    with pytest.raises(SignatureError, match="after the signer's certificate expired") as e:
        verify_module(after, MODULE, [cert])
    assert e.value.reason == "signer-expired"


def test_a_certificate_not_yet_valid_does_not_vouch() -> None:
    key, cert = make_signer(NOW + DAY, NOW + 365 * DAY)
    sgn = sign(key, cert, NOW + 2 * DAY)
    with pytest.raises(SignatureError, match="is not yet valid") as info:
        verify_module(sgn, MODULE, [cert])
    assert info.value.reason == "signer-not-yet-valid"


def test_the_module_and_the_signer_still_matter() -> None:
    key, cert = make_signer(NOW - DAY, NOW + DAY)
    _other_key, other = make_signer(NOW - DAY, NOW + DAY)
    sgn = sign(key, cert, NOW)
    with pytest.raises(SignatureError) as info:
        verify_module(sgn, MODULE + b"!", [cert])
    assert info.value.reason == "module-altered"
    with pytest.raises(SignatureError) as info:
        verify_module(sgn, MODULE, [other])
    assert info.value.reason == "untrusted-signer"


def test_an_unreadable_signing_time_is_malformed() -> None:
    key, cert = make_signer(NOW - DAY, NOW + DAY)
    doc = json.loads(sign(key, cert, NOW))
    manifest = replace(Manifest(**doc["manifest"]), signed_at="yesterday")
    doc["manifest"] = asdict(manifest)
    signature = key.sign(manifest.canonical(), ec.ECDSA(hashes.SHA256()))
    doc["signature"] = base64.b64encode(signature).decode()
    assert doc["format"] == FORMAT
    with pytest.raises(SignatureError, match="signed_at 'yesterday'") as info:
        verify_module(json.dumps(doc).encode(), MODULE, [cert])
    assert info.value.reason == "malformed"
