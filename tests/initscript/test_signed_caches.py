"""COMPILE_SERVER and REQUIRE_SIGNED: settings, requests, and what a signature must say."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stapinit.core.bashvars import Assignment, ConfigError
from stapinit.core.runtime import RuntimeKind
from stapinit.initscript import cache
from stapinit.initscript.cache import KernelIdentity
from stapinit.initscript.options import TABLE, Argument, Phase, parse_options, split_options
from stapinit.initscript.remote import (
    RemoteError,
    ServerOptions,
    build_request,
    check_response,
    server_options,
)
from stapinit.initscript.scripts import Script
from stapinit.initscript.settings import settings_from_assignments
from stapinit.initscript.verify import Expected, check, expected_manifest, read_bounded
from stapinit.protocol import DEFAULT_PORT, CompileResponse, Module, ProtocolError, read_tapsets
from stapinit.server.policy import PolicyError, parse_compile_options
from stapinit.trust.address import ServerAddress
from stapinit.trust.signing import sign_module
from tests.support.prefix import Prefix
from tests.trust.signers import make_signer

KERNEL = KernelIdentity("6.1.0-test", "#1 SMP", "x86_64")
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)
MODULE = b"\x7fELF a module"


def script(options: str = "--runtime=bpf", name: str = "tick") -> Script:
    parsed = tuple(parse_options(split_options(options)))
    runtime: RuntimeKind = "bpf" if "bpf" in options else "kmod"
    return Script(name, Path(f"/etc/systemtap/script.d/{name}.stp"), parsed, (), runtime)


# --- settings -----------------------------------------------------------------------


def assign(**values: str) -> list[Assignment]:
    return [Assignment(k, v, "cfg", i + 1) for i, (k, v) in enumerate(values.items())]


def test_compile_servers_are_parsed_in_order_with_the_default_port() -> None:
    settings = settings_from_assignments(
        assign(COMPILE_SERVER="build1 10.0.0.2:9000 [fe80::1]:7000 [::1]")
    )
    assert settings.compile_servers == (
        ServerAddress("build1", DEFAULT_PORT),
        ServerAddress("10.0.0.2", 9000),
        ServerAddress("fe80::1", 7000),
        ServerAddress("::1", DEFAULT_PORT),
    )
    defaults = settings_from_assignments([])
    assert (defaults.compile_servers, defaults.require_signed) == ((), False)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("host:0", "invalid port in server address 'host:0'"),
        ("host:http", "invalid port"),
        ("a::b", "write IPv6 addresses as [ADDR]:PORT"),
        (":9000", "no host"),
        ("[nonsense]", "invalid IPv6 address"),
    ],
)
def test_a_bad_compile_server_names_file_line_and_word(value: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"^cfg:2: COMPILE_SERVER: ") as info:
        settings_from_assignments(assign(PASSALL="yes", COMPILE_SERVER=value))
    assert why in str(info.value)


def test_require_signed_is_a_boolean() -> None:
    assert settings_from_assignments(assign(REQUIRE_SIGNED="yes")).require_signed is True
    with pytest.raises(ConfigError, match=r"^cfg:1: REQUIRE_SIGNED='sure' is not a boolean"):
        settings_from_assignments(assign(REQUIRE_SIGNED="sure"))


# --- what a compile request carries --------------------------------------------------


def test_request_options_are_the_compile_options_minus_their_own_fields() -> None:
    split = server_options(
        script("--runtime=bpf -o /tmp/out -w -I /usr/local/tapsets --unprivileged -D X=1 -c ls")
    )
    # Sent: compile and report options; signed: the compile options (the record's).
    assert split == ServerOptions(
        ("-w", "-D", "X=1"), "stapusr", ("/usr/local/tapsets",), ("-D", "X=1")
    )
    assert server_options(script("--privilege=stapdev -v")).privilege == "stapdev"
    assert server_options(script("--privilege stapusr")).privilege == "stapusr"
    assert server_options(script("")) == ServerOptions((), "stapdev", (), ())


def test_stapsys_cannot_go_to_a_server() -> None:
    with pytest.raises(RemoteError, match="--privilege=stapsys cannot be compiled through"):
        server_options(script("--privilege=stapsys"))


def test_the_request_names_the_target_kernel_module_and_runtime() -> None:
    req = build_request(script("--runtime=bpf -w"), "probe begin {}\n", (), KERNEL)
    assert (req.script_name, req.module_name, req.release, req.arch) == (
        "tick.stp",
        "tick",
        "6.1.0-test",
        "x86_64",
    )
    assert (req.runtime, req.privilege, req.options, req.eval) == ("bpf", "stapdev", ("-w",), False)
    assert build_request(script(""), "", (), KERNEL).runtime == "kmod"


def test_tapsets_are_read_relative_to_their_directory(tmp_path: Path) -> None:
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "x.stp").write_text("function x() { return 1 }\n")
    (tmp_path / "a" / "notes.txt").write_text("not a tapset")
    tapsets = read_tapsets([str(tmp_path / "a")])
    assert [(t.path, t.text) for t in tapsets] == [("sub/x.stp", "function x() { return 1 }\n")]
    (tmp_path / "b" / "sub").mkdir(parents=True)
    (tmp_path / "b" / "sub" / "x.stp").write_text("function x() { return 2 }\n")
    with pytest.raises(ProtocolError, match=r"tapset sub/x\.stp is in more than one -I directory"):
        read_tapsets([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(ProtocolError, match="not a directory"):
        read_tapsets([str(tmp_path / "missing")])


@pytest.mark.parametrize(
    ("response", "why"),
    [
        (CompileResponse(1, "", "semantic error: no probes\n"), "semantic error: no probes"),
        (CompileResponse(0, "", ""), "sent no module"),
        (CompileResponse(0, "", "", Module("other.bo", MODULE), b"{}"), "sent other.bo, not"),
        (CompileResponse(0, "", "", Module("tick.bo", MODULE)), "sent tick.bo unsigned"),
    ],
)
def test_an_answer_without_a_signed_module_of_this_name_is_a_failure(
    response: CompileResponse, why: str
) -> None:
    with pytest.raises(RemoteError, match=why):
        check_response(script(), response)
    good = CompileResponse(0, "", "", Module("tick.bo", MODULE), b"sgn")
    assert check_response(script(), good) == (MODULE, b"sgn")


# --- what a signature must say -------------------------------------------------------


def signed(options: tuple[str, ...] = ("-u",), **changes: str) -> bytes:
    key, cert = SIGNER
    fields = {
        "module_name": "tick.bo",
        "source": SOURCE,
        "release": KERNEL.release,
        "arch": KERNEL.machine,
        "privilege": "stapdev",
        "runtime": "bpf",
        **changes,
    }
    return sign_module(
        key,
        cert,
        MODULE,
        fields["module_name"],
        fields["release"],
        fields["arch"],
        fields["privilege"],
        options=options,
        runtime=fields["runtime"],
        source=fields["source"],
    )


SIGNER = make_signer(NOW - DAY, NOW + 365 * DAY)
SOURCE = hashlib.sha256(b"probe timer.s(1) { }\n").hexdigest()
WANTED = expected_manifest(script("--runtime=bpf -u -w -o /var/log/tick.out"), KERNEL, SOURCE)


def test_what_a_script_expects_of_its_signature() -> None:
    # The options its record holds: neither -w (report) nor -o (run time).
    wanted = Expected("tick.bo", SOURCE, "6.1.0-test", "x86_64", "bpf", "stapdev", ("-u",))
    assert wanted == WANTED


def test_a_report_option_changes_neither_the_record_nor_the_signature_wanted() -> None:
    for options in ("--runtime=bpf -u", "--runtime=bpf -v -u --vp 01 -w"):
        assert expected_manifest(script(options), KERNEL, SOURCE) == WANTED
        assert script(options).recorded_options == ["-u"]


# Values the server's policy takes, for the options of the table that need one.
SAMPLE_VALUES = {
    "D": "X=1",
    "E": "probe end {}",
    "--modinfo": "a=b",
    "--compatible": "4.0",
    "--prologue-searching": "never",
    "--privilege": "stapusr",
}


def test_the_server_signs_exactly_the_options_a_record_holds() -> None:
    """Option by option: what the server leaves out of a signature is phase REPORT here."""
    accepted: dict[str, tuple[str, ...]] = {}
    for row in TABLE:
        if row.phase not in (Phase.COMPILE, Phase.REPORT):
            continue  # never sent to a server
        name = row.flag if row.flag.startswith("--") else f"-{row.flag}"
        words = [name]
        if row.argument is Argument.REQUIRED:
            words.append(SAMPLE_VALUES.get(row.flag, "1"))
        split = server_options(script(shlex.join(words)))
        try:
            parsed = parse_compile_options(split.options, False, "kmod")
        except PolicyError:
            continue  # refused: nothing is compiled, nothing signed
        assert parsed.signed == split.signed, name
        accepted[name] = split.signed
    # Not vacuous: report and compile options of both kinds went through.
    assert {"-v", "-w", "--vp", "-u", "-D", "-T", "--compatible"} <= set(accepted)
    assert accepted["-w"] == () and accepted["-D"] == ("-D", "X=1")


def test_a_signature_that_fits_in_every_way_passes() -> None:
    assert check(signed(), MODULE, [SIGNER[1]], WANTED) is None


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"module_name": "tock.bo"}, "signed for module name 'tock.bo', not 'tick.bo'"),
        ({"release": "6.2.0"}, "signed for release '6.2.0', not '6.1.0-test'"),
        ({"arch": "aarch64"}, "signed for arch 'aarch64', not 'x86_64'"),
        ({"runtime": "kmod"}, "signed for runtime 'kmod', not 'bpf'"),
        ({"privilege": "stapusr"}, "signed for privilege 'stapusr', not 'stapdev'"),
        ({"options": ()}, "signed for options no options, not [-u]"),
        ({"options": ("-u", "-w")}, "signed for options [-u -w], not [-u]"),
        (
            {"source": "ab" * 32},
            f"signed for another script text or tapsets (sha256 abababababababab...) "
            f"than this host's tick.stp and its -I directories (sha256 {SOURCE[:16]}...)",
        ),
    ],
)
def test_a_signature_for_anything_else_is_refused(changes: dict[str, Any], why: str) -> None:
    assert check(signed(**changes), MODULE, [SIGNER[1]], WANTED) == why


def test_a_module_changed_or_signed_by_someone_else_is_refused() -> None:
    changed = check(signed(), MODULE + b"\0", [SIGNER[1]], WANTED)
    assert changed == "signature refused: module tick.bo does not match its signature"
    _key, stranger = make_signer(NOW - DAY, NOW + DAY)
    untrusted = check(signed(), MODULE, [stranger], WANTED)
    assert untrusted is not None and untrusted.endswith("is not a trusted signer")
    later = check(signed(), MODULE, [SIGNER[1]], WANTED, now=NOW + 400 * DAY)
    assert later is not None and "the signer's certificate has expired" in later
    assert check(b"not json", MODULE, [SIGNER[1]], WANTED) == (
        "signature refused: malformed signature file: not JSON"
    )


def test_signed_files_are_read_only_when_regular_and_bounded(tmp_path: Path) -> None:
    regular = tmp_path / "tick.bo.sgn"
    regular.write_bytes(b"x" * 10)
    assert read_bounded(regular, 10) == b"x" * 10
    with pytest.raises(ValueError, match="larger than 9 bytes"):
        read_bounded(regular, 9)
    link = tmp_path / "link.sgn"
    link.symlink_to(regular)
    with pytest.raises(OSError):
        read_bounded(link, 100)
    fifo = tmp_path / "fifo.sgn"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        read_bounded(fifo, 100)  # returns at once: opened without blocking
    sock_path = tmp_path / "s.sgn"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(OSError):
            read_bounded(sock_path, 100)


def test_installing_a_cache_keeps_a_signature_only_beside_its_own_module(tmp_path: Path) -> None:
    built = tmp_path / "built.bo"
    built.write_bytes(MODULE)
    record = cache.CacheRecord(KERNEL, "bpf", ())
    directory = tmp_path / "cache"
    cache.install(directory, "tick", ".bo", built, record, b"signature")
    assert (directory / "tick.bo.sgn").read_bytes() == b"signature"
    # A local compile replaces it: the old signature must not vouch for the new module.
    cache.install(directory, "tick", ".bo", built, record)
    assert not (directory / "tick.bo.sgn").exists()
    cache.install(directory, "tick", ".bo", built, record, b"signature")
    assert sorted(p.name for p in cache.remove(directory, "tick")) == [
        "tick.bo",
        "tick.bo.sgn",
        "tick.opts",
    ]


# --- the boot path ------------------------------------------------------------------

LOADED = """
import sys
from stapinit.initscript.cli import main
code = main(sys.argv[1:])
print(sorted({m.split('.')[0] for m in sys.modules} & {'cryptography', 'ssl'}), code)
"""


def test_crypto_and_tls_are_loaded_only_when_the_settings_ask(kmod_prefix: Prefix) -> None:
    kmod_prefix.add_script("tick", "probe begin {}\n")
    assert kmod_prefix.run("compile", "-y").returncode == 0

    def loaded(**settings: str) -> str:
        kmod_prefix.write_config(**settings)
        done = subprocess.run(
            [sys.executable, "-c", LOADED, "status", "-c", str(kmod_prefix.config)],
            capture_output=True,
            text=True,
            env={**os.environ, **kmod_prefix.env},
        )
        return done.stdout.splitlines()[-1]

    assert loaded() == "[] 3"
    assert loaded(REQUIRE_SIGNED="yes") == "['cryptography'] 3"
    # A compile server is only contacted to compile: status loads neither.
    assert loaded(REQUIRE_SIGNED="no", COMPILE_SERVER="127.0.0.1:1") == "[] 3"
