"""The stap-authorize-server-cert and stap-authorize-signing-cert commands, run for real."""

from __future__ import annotations

import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from stapinit.trust.certs import fingerprint
from stapinit.trust.stores import file_name_for
from tests.trust.conftest import Identity
from tests.trust.people import User, home_for, run_as, shared_tmpdir

SERVER_CMD = "stap-authorize-server-cert"
SIGNING_CMD = "stap-authorize-signing-cert"


@pytest.fixture
def base() -> Iterator[Path]:
    path = shared_tmpdir("sttest-auth-")
    yield path
    shutil.rmtree(path)


def env_for(root: Path, home: Path) -> dict[str, str]:
    return {"STAP_TRUST_ROOT": str(root), "HOME": str(home)}


def readable_cert(identity: Identity, base: Path) -> Path:
    """The certificate copied where any user can read it."""
    path = base / "stap.cert"
    path.write_bytes(identity.cert_path.read_bytes())
    path.chmod(0o644)
    return path


def test_root_authorizes_system_wide_and_twice_is_harmless(base: Path, identity: Identity) -> None:
    cert = readable_cert(identity, base)
    env = env_for(base / "root", base)
    fp = fingerprint(identity.cert)
    stored = base / "root/etc/systemtap/ssl/client" / file_name_for(fp)

    first = run_as(None, [SERVER_CMD, str(cert)], env, base)
    assert first.returncode == 0, first.stderr
    assert stored.is_file() and stat.S_IMODE(stored.stat().st_mode) == 0o644
    assert fp in first.stdout
    assert any(
        line.startswith("  subject: ") and "CN=server.example" in line
        for line in first.stdout.splitlines()
    )
    assert "expires: " in first.stdout

    second = run_as(None, [SERVER_CMD, str(cert)], env, base)
    assert second.returncode == 0, second.stderr
    assert "already" in second.stdout
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]

    listed = run_as(None, [SERVER_CMD, "--list"], env, base)
    assert listed.returncode == 0 and fp in listed.stdout

    revoked = run_as(None, [SERVER_CMD, "--revoke", fp], env, base)
    assert revoked.returncode == 0, revoked.stderr
    assert not stored.exists()
    again = run_as(None, [SERVER_CMD, "--revoke", fp], env, base)
    assert again.returncode == 1 and "is not in" in again.stderr


def test_user_authorizes_into_their_own_store(
    base: Path, identity: Identity, users: dict[str, User]
) -> None:
    user = users["sttest_plain"]
    home = home_for(user, base)
    cert = readable_cert(identity, base)
    env = env_for(base / "root", home)
    result = run_as(user, [SERVER_CMD, str(cert)], env, home)
    assert result.returncode == 0, result.stderr
    stored = home / ".systemtap/ssl/client" / file_name_for(fingerprint(identity.cert))
    assert stored.is_file() and stored.stat().st_uid == user.uid
    assert not (base / "root/etc/systemtap/ssl/client").exists()
    listed = run_as(user, [SERVER_CMD, "--list"], env, home)
    assert "per-user server trust store" in listed.stdout
    assert fingerprint(identity.cert) in listed.stdout


@pytest.mark.parametrize("cmd", [SERVER_CMD, SIGNING_CMD])
def test_a_file_that_is_not_a_certificate_is_refused(base: Path, cmd: str) -> None:
    bogus = base / "notacert.pem"
    bogus.write_text("-----BEGIN CERTIFICATE-----\nhello\n-----END CERTIFICATE-----\n")
    result = run_as(None, [cmd, str(bogus)], env_for(base / "root", base), base)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{cmd}: {bogus}: not an X.509 certificate"
    assert not (base / "root").exists()


def test_missing_file_is_one_clear_line(base: Path) -> None:
    result = run_as(None, [SERVER_CMD, str(base / "nope")], env_for(base / "root", base), base)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "No such file or directory" in result.stderr


def test_signing_cert_is_roots_business(
    base: Path, identity: Identity, users: dict[str, User]
) -> None:
    cert = readable_cert(identity, base)
    env = env_for(base / "root", base)
    for name in ("sttest_usr", "sttest_dev"):
        refused = run_as(users[name], [SIGNING_CMD, str(cert)], env, base)
        assert refused.returncode == 1
        assert "only root may authorize module signers" in refused.stderr
    assert not (base / "root/etc/systemtap/staprun").exists()

    done = run_as(None, [SIGNING_CMD, str(cert)], env, base)
    assert done.returncode == 0, done.stderr
    fp = fingerprint(identity.cert)
    assert (base / "root/etc/systemtap/staprun" / file_name_for(fp)).is_file()
    assert fp in run_as(None, [SIGNING_CMD, "--list"], env, base).stdout
    assert run_as(None, [SIGNING_CMD, "--revoke", fp], env, base).returncode == 0
    assert not any((base / "root/etc/systemtap/staprun").iterdir())
