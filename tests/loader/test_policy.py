"""Who may load what (spec §6.1.2, §6.1.3): the pure decision."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapinit.loader.policy import (
    Caller,
    Host,
    Level,
    SignatureStatus,
    caller_level,
    may_load,
    must_check_user_space,
)
from stapinit.trust.signing import Manifest

HOST = Host("6.1.0-test", "x86_64")
MODULE = "hello.bo"
SIGNED = Manifest(
    module_sha256="00" * 32,
    module_name="hello.bo",
    source="22" * 32,
    release=HOST.release,
    arch=HOST.arch,
    runtime="bpf",
    privilege="stapusr",
    options=(),
    signer_fingerprint="SHA256:" + "11" * 32,
    signed_at="2025-01-01T00:00:00Z",
)
ROOT = Caller(0, "root", frozenset({"root"}))
DEV = Caller(1001, "dev", frozenset({"stapdev"}))
SYS = Caller(1002, "sys", frozenset({"stapsys"}))
USR = Caller(1003, "usr", frozenset({"stapusr", "users"}))
PLAIN = Caller(1004, "plain", frozenset({"users"}))
STATUSES: tuple[SignatureStatus, ...] = tuple(
    status for part in typing.get_args(SignatureStatus) for status in typing.get_args(part)
)
UPROBE = "uprobe/p/0/4400/tmp/elf/victim"


def test_levels() -> None:
    assert caller_level(0, ()) is Level.STAPDEV
    assert caller_level(5, ["stapdev", "stapusr"]) is Level.STAPDEV
    assert caller_level(5, ["stapsys"]) is Level.STAPSYS
    assert caller_level(5, ["stapusr"]) is Level.STAPUSR
    assert caller_level(5, ["wheel", "adm"]) is None


@pytest.mark.parametrize("caller", [ROOT, DEV])
@pytest.mark.parametrize("status", STATUSES)
def test_root_and_stapdev_load_anything(caller: Caller, status: SignatureStatus) -> None:
    manifest = SIGNED if status == "valid" else None
    assert may_load(caller, MODULE, manifest, status, HOST).allowed


@pytest.mark.parametrize("status", STATUSES)
def test_ordinary_users_never_load(status: SignatureStatus) -> None:
    manifest = SIGNED if status == "valid" else None
    decision = may_load(PLAIN, MODULE, manifest, status, HOST)
    assert not decision.allowed
    assert "may not load modules" in decision.reason and "-p4" in decision.reason


@pytest.mark.parametrize("caller", [USR, SYS])
def test_stapusr_loads_a_validly_signed_module(caller: Caller) -> None:
    assert may_load(caller, MODULE, SIGNED, "valid", HOST).allowed


@pytest.mark.parametrize(
    ("status", "phrase"),
    [
        ("unsigned", "does not have authority to load the unsigned module hello.bo"),
        ("untrusted-signer", "the server is not a trusted signer"),
        ("bad-signature", "has been altered since it was signed"),
        ("module-altered", "has been altered since it was signed"),
        ("malformed", "unusable signature"),
        ("signer-expired", "could not be loaded: the checker's words"),
        ("signer-not-yet-valid", "could not be loaded: the checker's words"),
    ],
)
def test_stapusr_refusals_say_why(status: SignatureStatus, phrase: str) -> None:
    decision = may_load(USR, MODULE, None, status, HOST, detail="the checker's words")
    assert not decision.allowed
    assert phrase in decision.reason
    if status != "unsigned":
        assert "the checker's words" in decision.reason


@pytest.mark.parametrize(
    ("change", "phrase"),
    [
        ({"privilege": "stapdev"}, "signed for privilege 'stapdev'"),
        ({"privilege": "root"}, "signed for privilege 'root'"),
        ({"module_name": "other.bo"}, "was signed as 'other.bo'"),
        ({"module_name": "hello.ko"}, "was signed as 'hello.ko'"),
        ({"module_name": "hello"}, "was signed as 'hello'"),
        ({"release": "5.10.0-old"}, "not this host's 6.1.0-test"),
        ({"arch": "aarch64"}, "not this host's 6.1.0-test (x86_64)"),
    ],
)
def test_signed_manifest_must_fit_caller_and_host(
    change: dict[str, typing.Any], phrase: str
) -> None:
    manifest = dataclasses.replace(SIGNED, **change)
    decision = may_load(USR, MODULE, manifest, "valid", HOST)
    assert not decision.allowed
    assert phrase in decision.reason


@pytest.mark.parametrize(
    ("status", "phrase"),
    [
        ("signer-expired", "the signer's certificate has expired"),
        ("signer-not-yet-valid", "the signer's certificate is not yet valid"),
    ],
)
def test_signer_validity_refusals_stand_without_detail(
    status: SignatureStatus, phrase: str
) -> None:
    decision = may_load(USR, MODULE, None, status, HOST)
    assert (decision.allowed, decision.reason) == (
        False,
        f"module hello.bo could not be loaded: {phrase}",
    )


def test_all_statuses_are_covered() -> None:
    assert len(STATUSES) == 8 and "signer-expired" in STATUSES


@pytest.mark.parametrize("caller", [USR, SYS])
def test_a_bpf_module_probing_user_space_is_refused_below_stapdev(caller: Caller) -> None:
    assert must_check_user_space(caller, "hello.bo")
    decision = may_load(caller, MODULE, SIGNED, "valid", HOST, user_space_probes=[UPROBE])
    assert not decision.allowed
    assert decision.reason == (
        f"module hello.bo probes user space ({UPROBE}): user-space probes are not allowed "
        "for unprivileged users under the BPF runtime"
    )


@pytest.mark.parametrize("caller", [ROOT, DEV])
def test_stapdev_may_probe_user_space_under_bpf(caller: Caller) -> None:
    assert not must_check_user_space(caller, "hello.bo")
    assert may_load(caller, MODULE, None, "unsigned", HOST, user_space_probes=[UPROBE]).allowed


def test_kernel_modules_and_ordinary_users_are_not_examined() -> None:
    # The kernel-module runtime confines a stapusr module to the caller's processes;
    # an ordinary user is refused before anything is examined.
    assert not must_check_user_space(USR, "hello.ko")
    assert not must_check_user_space(PLAIN, "hello.bo")


def test_stapsys_may_load_stapsys_but_stapusr_may_not() -> None:
    manifest = dataclasses.replace(SIGNED, privilege="stapsys")
    assert may_load(SYS, MODULE, manifest, "valid", HOST).allowed
    assert not may_load(USR, MODULE, manifest, "valid", HOST).allowed


@given(
    uid=st.integers(min_value=1, max_value=2**31 - 1),
    groups=st.frozensets(st.sampled_from(["stapdev", "stapsys", "stapusr", "wheel", "adm"])),
    status=st.sampled_from(STATUSES),
    privilege=st.sampled_from(["stapusr", "stapsys", "stapdev", "bogus"]),
)
def test_loading_needs_stapdev_or_a_valid_signature_within_level(
    uid: int, groups: frozenset[str], status: SignatureStatus, privilege: str
) -> None:
    manifest = dataclasses.replace(SIGNED, privilege=privilege) if status == "valid" else None
    decision = may_load(Caller(uid, "u", groups), MODULE, manifest, status, HOST)
    level = caller_level(uid, groups)
    expected = level is Level.STAPDEV or (
        level is not None
        and status == "valid"
        and privilege in ("stapusr", "stapsys")
        and Level[privilege.upper()] <= level
    )
    assert decision.allowed == expected
