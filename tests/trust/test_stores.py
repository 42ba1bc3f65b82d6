"""Trust stores: naming, atomic writes, and which stores are believed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapinit.trust.certs import fingerprint
from stapinit.trust.stores import (
    StoreError,
    StorePaths,
    TrustStore,
    file_name_for,
    normalize_fingerprint,
    signer_store,
    system_server_store,
    trusted_server_fingerprints,
    unsafe_reason,
    user_server_store,
)
from tests.trust.conftest import Identity, make_identity

HEX = "ab" * 32


def root_store(path: Path) -> TrustStore:
    return TrustStore(path, frozenset({0}), "test store")


# --- pure helpers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f"SHA256:{HEX}",
        HEX,
        HEX.upper(),
        f"sha256:{HEX}",
        ":".join([HEX[i : i + 2] for i in range(0, 64, 2)]),
    ],
)
def test_fingerprint_spellings_normalize_to_one(text: str) -> None:
    assert normalize_fingerprint(text) == f"SHA256:{HEX}"


@pytest.mark.parametrize("text", ["", "SHA256:", HEX[:-1], HEX + "0", "zz" * 32, "MD5:" + HEX])
def test_malformed_fingerprints_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        normalize_fingerprint(text)


@given(st.binary(min_size=32, max_size=32))
def test_store_file_name_is_the_hex_fingerprint(digest: bytes) -> None:
    fp = "SHA256:" + digest.hex()
    assert file_name_for(fp) == digest.hex() + ".pem"
    assert file_name_for(fp.upper().replace("SHA256:", "sha256:")) == digest.hex() + ".pem"


def test_unsafe_reason_rules() -> None:
    p = Path("/x")
    dir_mode = stat.S_IFDIR
    assert unsafe_reason(p, 0, dir_mode | 0o755, {0}, is_ancestor=False) is None
    assert "owned by uid 1000, not root" in str(
        unsafe_reason(p, 1000, dir_mode | 0o755, {0}, is_ancestor=False)
    )
    assert "writable by group or others (mode 0775)" in str(
        unsafe_reason(p, 0, dir_mode | 0o775, {0}, is_ancestor=False)
    )
    # /tmp-like parents are fine, a /tmp-like store is not.
    assert unsafe_reason(p, 0, dir_mode | 0o1777, {0}, is_ancestor=True) is None
    assert unsafe_reason(p, 0, dir_mode | 0o1777, {0}, is_ancestor=False) is not None
    assert unsafe_reason(p, 0, dir_mode | 0o777, {0}, is_ancestor=True) is not None
    assert unsafe_reason(p, 1000, dir_mode | 0o700, {1000, 0}, is_ancestor=False) is None


def test_default_paths_follow_the_trust_root_and_home(tmp_path: Path) -> None:
    paths = StorePaths.default({"STAP_TRUST_ROOT": str(tmp_path), "HOME": "/home/u"})
    assert paths.system_servers == tmp_path / "etc/systemtap/ssl/client"
    assert paths.signers == tmp_path / "etc/systemtap/staprun"
    assert paths.user_servers == Path("/home/u/.systemtap/ssl/client")
    plain = StorePaths.default({})
    assert plain.system_servers == Path("/etc/systemtap/ssl/client")
    assert plain.signers == Path("/etc/systemtap/staprun")
    assert plain.user_servers is None


# --- adding, listing, revoking ------------------------------------------------------


def test_add_writes_a_0644_pem_named_by_fingerprint(tmp_path: Path, identity: Identity) -> None:
    store = root_store(tmp_path / "a" / "b" / "store")
    old = os.umask(0o077)
    try:
        path, added = store.add(identity.cert)
    finally:
        os.umask(old)
    assert added
    assert path == store.path / file_name_for(fingerprint(identity.cert))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    for directory in (tmp_path / "a", tmp_path / "a" / "b", store.path):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    assert path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert [p.name for p in store.path.iterdir()] == [path.name]  # no temp files left
    warnings: list[str] = []
    assert store.fingerprints(warnings.append) == {fingerprint(identity.cert)}
    assert warnings == []


def test_adding_twice_is_harmless(tmp_path: Path, identity: Identity) -> None:
    store = root_store(tmp_path / "store")
    first, added = store.add(identity.cert)
    before = first.read_bytes()
    second, added_again = store.add(identity.cert)
    assert (added, added_again) == (True, False)
    assert first == second and second.read_bytes() == before
    assert len(list(store.path.iterdir())) == 1


def test_revoke_removes_only_that_certificate(tmp_path: Path, identity: Identity) -> None:
    store = root_store(tmp_path / "store")
    other = make_identity(tmp_path / "other", "other.example")
    store.add(identity.cert)
    store.add(other.cert)
    store.revoke(fingerprint(identity.cert).upper().replace("SHA256:", ""))
    assert store.fingerprints(pytest.fail) == {fingerprint(other.cert)}
    with pytest.raises(StoreError, match="is not in"):
        store.revoke(fingerprint(identity.cert))
    with pytest.raises(StoreError, match="not a SHA-256 fingerprint"):
        store.revoke("../../etc/passwd")


# --- which stores are believed -----------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "owner", "why"),
    [
        (0o777, 0, "writable by group or others"),
        (0o775, 0, "writable by group or others"),
        (0o755, 4321, "owned by uid 4321, not root"),
    ],
)
def test_unsafe_store_is_ignored_with_a_warning(
    tmp_path: Path, identity: Identity, mode: int, owner: int, why: str
) -> None:
    store = root_store(tmp_path / "store")
    store.add(identity.cert)
    store.path.chmod(mode)
    os.chown(store.path, owner, 0)
    warnings: list[str] = []
    assert store.certificates(warnings.append) == []
    assert len(warnings) == 1
    assert "ignoring the test store" in warnings[0] and why in warnings[0]
    with pytest.raises(StoreError, match=why):
        store.add(make_identity(tmp_path / "new").cert)


def test_store_under_a_writable_directory_is_ignored(tmp_path: Path, identity: Identity) -> None:
    store = root_store(tmp_path / "parent" / "store")
    store.add(identity.cert)
    (tmp_path / "parent").chmod(0o777)  # anyone could rename "store" away and replace it
    warnings: list[str] = []
    assert store.certificates(warnings.append) == []
    assert "parent is writable by group or others" in warnings[0]


def test_bad_entries_are_skipped_not_fatal(tmp_path: Path, identity: Identity) -> None:
    store = root_store(tmp_path / "store")
    good, _ = store.add(identity.cert)
    other = make_identity(tmp_path / "other", "other.example")
    (store.path / "garbage.pem").write_text("not a certificate\n")
    (store.path / "notes.txt").write_text("ignored: not a .pem\n")
    loose = store.path / ("cd" * 32 + ".pem")
    loose.write_bytes(other.cert_path.read_bytes())
    loose.chmod(0o666)
    (store.path / ("ef" * 32 + ".pem")).symlink_to(other.cert_path)
    warnings: list[str] = []
    assert [c.path for c in store.certificates(warnings.append)] == [good]
    text = "\n".join(warnings)
    assert "garbage.pem: " in text and "not an X.509 certificate" in text
    assert "writable by group or others" in text
    assert "not a regular file" in text
    assert len(warnings) == 3


def test_missing_store_is_empty_and_silent(tmp_path: Path) -> None:
    assert root_store(tmp_path / "nope").certificates(pytest.fail) == []


def test_user_store_may_belong_to_its_user(tmp_path: Path, identity: Identity) -> None:
    paths = StorePaths.default({"STAP_TRUST_ROOT": str(tmp_path / "root")}, home=tmp_path / "home")
    user_store = user_server_store(paths, 4321)
    assert user_store is not None
    user_store.add(identity.cert)
    for p in (tmp_path / "home", tmp_path / "home/.systemtap", tmp_path / "home/.systemtap/ssl"):
        os.chown(p, 4321, 4321)
    os.chown(user_store.path, 4321, 4321)
    fp = fingerprint(identity.cert)
    assert trusted_server_fingerprints(paths, 4321, pytest.fail) == {fp}
    # The same directory is somebody else's to them: not trusted for uid 5555.
    warnings: list[str] = []
    assert trusted_server_fingerprints(paths, 5555, warnings.append) == set()
    assert "owned by uid 4321" in warnings[0]


def test_system_and_signer_stores_must_be_roots(tmp_path: Path, identity: Identity) -> None:
    paths = StorePaths.default({"STAP_TRUST_ROOT": str(tmp_path)})
    for store in (system_server_store(paths), signer_store(paths)):
        store.add(identity.cert)
        assert store.fingerprints(pytest.fail) == {fingerprint(identity.cert)}
        os.chown(store.path, 4321, 0)
        warnings: list[str] = []
        assert store.fingerprints(warnings.append) == set()
        assert "not root" in warnings[0]


def test_add_repairs_a_damaged_or_loose_entry(tmp_path: Path, identity: Identity) -> None:
    store = root_store(tmp_path / "store")
    path, _ = store.add(identity.cert)
    path.write_text("damaged\n")
    assert store.add(identity.cert) == (path, True)
    path.chmod(0o666)
    assert store.add(identity.cert) == (path, True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert store.fingerprints(pytest.fail) == {fingerprint(identity.cert)}


def test_a_symlink_on_the_way_is_judged_by_where_it_leads(
    tmp_path: Path, identity: Identity
) -> None:
    real = root_store(tmp_path / "real" / "store")
    real.add(identity.cert)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    via_link = root_store(tmp_path / "link" / "store")
    assert via_link.fingerprints(pytest.fail) == {fingerprint(identity.cert)}
    (tmp_path / "real").chmod(0o777)
    warnings: list[str] = []
    assert via_link.fingerprints(warnings.append) == set()
    assert "real is writable by group or others" in warnings[0]
