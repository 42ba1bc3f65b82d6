"""Loading, generating and refusing the server's identity."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from stapinit.server.identity import (
    CERT_NAME,
    KEY_NAME,
    IdentityError,
    expires_soon,
    load_or_create,
)
from stapinit.trust.certs import fingerprint, generate_identity


def test_first_start_generates_then_reloads(tmp_path: Path) -> None:
    cert_dir = tmp_path / ".systemtap" / "ssl" / "server"
    first = load_or_create(cert_dir, 1825)
    assert first.key_path == cert_dir / KEY_NAME
    assert first.cert_path == cert_dir / CERT_NAME
    assert first.key_path.stat().st_mode & 0o777 == 0o600
    again = load_or_create(cert_dir, 1825)
    assert again.fingerprint == first.fingerprint == fingerprint(first.cert)
    assert not expires_soon(again)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_exposed_key_is_refused(tmp_path: Path, mode: int) -> None:
    identity = load_or_create(tmp_path, 30)
    identity.key_path.chmod(mode)
    with pytest.raises(IdentityError) as err:
        load_or_create(tmp_path, 30)
    assert f"private key {identity.key_path} is group- or world-accessible (mode {mode:04o})" in (
        str(err.value)
    )
    assert f"chmod 600 {identity.key_path}" in str(err.value)


def test_half_an_identity_is_refused(tmp_path: Path) -> None:
    identity = load_or_create(tmp_path, 30)
    identity.key_path.unlink()
    with pytest.raises(IdentityError, match=r"key .* is missing"):
        load_or_create(tmp_path, 30)
    identity.cert_path.unlink()
    identity = load_or_create(tmp_path, 30)
    identity.cert_path.unlink()
    with pytest.raises(IdentityError, match=r"certificate .* is missing"):
        load_or_create(tmp_path, 30)


def test_mismatched_pair_is_refused(tmp_path: Path) -> None:
    identity = load_or_create(tmp_path / "a", 30)
    generate_identity(tmp_path / "b" / "k", identity.cert_path, "other")  # replaces the cert
    with pytest.raises(IdentityError, match="is not the certificate of"):
        load_or_create(tmp_path / "a", 30)


def test_expired_certificate_is_refused_with_renewal_hint(tmp_path: Path) -> None:
    identity = load_or_create(tmp_path, 10)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=11)
    with pytest.raises(IdentityError, match=r"expired on .*to renew, remove"):
        load_or_create(tmp_path, 10, now=later)
    assert expires_soon(identity)
