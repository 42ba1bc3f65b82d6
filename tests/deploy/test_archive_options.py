"""What an archive may set in a script's options, and what pack writes for the target."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapinit.core.runtime import RuntimeKind
from stapinit.initscript.cache import CacheRecord, KernelIdentity
from stapinit.initscript.options import (
    OptionError,
    compile_options,
    parse_options,
    recorded_options,
    split_options,
    start_options,
)
from stapinit.initscript.packing import (
    ARCHIVE_OPTIONS,
    Blob,
    PackError,
    archive_conf,
    check_conf_file,
    make_manifest,
    match_host,
    option_refusal,
)
from stapinit.initscript.scripts import Script

RELEASE = "6.1.0-56-amd64"


def option(text: str) -> str | None:
    """The refusal for the single option written as ``text`` (stap's own or the archive's)."""
    try:
        (parsed,) = parse_options(split_options(text))
    except OptionError as refused:
        return str(refused)
    return option_refusal(parsed)


# One accepted spelling of every option an archive may carry.
ACCEPTED = [
    "--runtime=bpf",
    "--runtime=kernel",
    "--bpf",
    "--privilege=stapusr",
    "--unprivileged",
    "--compatible=4.8",
    "--vp 01",
    "--skip-badvars",
    "--suppress-handler-errors",
    "--suppress-time-limits",
    "--no-global-var-display",
    "-T 10",
    "-DMAXACTION=10000",
    "-D STP_NO_OVERLOAD",
    "-g",
    "-u",
    "-w",
    "-W",
    "-v",
    "-P",
    "-b",
    "-t",
]


def test_every_allowed_option_has_an_accepted_spelling() -> None:
    flags = {parse_options(split_options(text))[0].flag for text in ACCEPTED}
    assert flags == set(ARCHIVE_OPTIONS)


@pytest.mark.parametrize("text", ACCEPTED)
def test_allowed_options_are_accepted_and_reach_the_compile(text: str) -> None:
    assert option(text) is None
    # Each one is a compile option (kept for stap -p4 and in the cache record)
    # or the runtime selection, recorded apart: none is a run-time option.
    parsed = parse_options(split_options(text))
    words = [word for each in parsed for word in each.words]
    assert compile_options(parsed) == words or text.startswith(("--runtime", "--bpf"))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        # Run-time options: they run commands or name files when the script starts.
        ("-c '/bin/sh -c id'", "-c /bin/sh -c id is a run-time option"),
        ("-o /root/file", "-o /root/file is a run-time option"),
        ("-x 1", "-x 1 is a run-time option"),
        ("-S 1,2", "-S 1,2 is a run-time option"),
        ("-s 4", "-s 4 is a run-time option"),
        ("-G x=1", "-G cannot be used here"),
        # Compile options that name host files, reach other programs or hosts.
        ("-I /home/user/tapsets", "not one of the compile options"),
        ("-R /home/user/runtime", "not one of the compile options"),
        ("-r /home/user/build", "not one of the compile options"),
        ("-B CC=/tmp/evil", "not one of the compile options"),
        ("-d /bin/ls", "not one of the compile options"),
        ("--remote=host", "cannot be used here: runs the script on another host"),
        ("--remote host", "cannot be used here: runs the script on another host"),
        ("--sysroot=/home/user", "not one of the compile options"),
        ("--sysenv=PATH=/home/user", "not one of the compile options"),
        ("--tmpdir=/home/user", "not one of the compile options"),
        ("--modinfo x=y", "not one of the compile options"),
        ("--use-server", "not one of the compile options"),
        ("--ldd", "not one of the compile options"),
        ("-e 'probe begin {}'", "not one of the compile options"),
        ("-E 'probe begin {}'", "not one of the compile options"),
        ("-m other", "not one of the compile options"),
        ("-p 2", "not one of the compile options"),
        ("-k", "not one of the compile options"),
        ("-q", "not one of the compile options"),
        ("-L 'kernel.*'", "cannot be used here: lists probes instead of compiling"),
        ("-F", "not one of the compile options"),
        ("--rlimit-cpu=10", "not one of the compile options"),
        ("--sign-module", "not one of the compile options"),
        ("-a arm64", "not one of the compile options"),
        # Allowed options with values they may not have.
        ("--runtime=dyninst", "the service runs kernel or bpf scripts"),
        ("--privilege=root", "value matching"),
        ("-D 'X=$(reboot)'", "value matching"),
        ("-D 'X=a b'", "value matching"),
        ("-DX=/etc/passwd", "value matching"),
        ("-D '-include/etc/shadow'", "value matching"),
        ("--compatible=../1", "value matching"),
        ("--bpf=yes", "takes no value"),
    ],
)
def test_everything_else_is_refused_with_the_option_named(text: str, why: str) -> None:
    refusal = option(text)
    assert refusal is not None and why in refusal and "\n" not in refusal


def conf(text: str) -> None:
    check_conf_file("conf.d/evil.conf", text, {"evil"})


def test_the_reported_attack_is_refused_naming_file_line_and_option() -> None:
    attack = 'evil_OPT=\'--runtime=bpf -c "/bin/sh -c \\"id > PROOF\\"" -o ROOT_ONLY_FILE\'\n'
    with pytest.raises(PackError) as refused:
        conf("# harmless\n" + attack)
    assert str(refused.value) == (
        'conf.d/evil.conf:2: evil_OPT: -c /bin/sh -c "id > PROOF" is a run-time option; '
        "only the target's own configuration sets those"
    )


def script(options: str, requires: tuple[str, ...] = ()) -> Script:
    parsed = tuple(parse_options(split_options(options)))
    runtime: RuntimeKind = "bpf" if "bpf" in options else "kmod"
    return Script("tick", Path("/x/tick.stp"), parsed, requires, runtime)


@pytest.mark.parametrize(
    ("options", "expected", "left_out"),
    [
        ("--runtime=bpf -o /var/log/t.out -DMAXACTION=5 -v", "--runtime=bpf -DMAXACTION=5 -v", 1),
        ("-g -c 'run this' -x 12 -s 8 -m name -F", "-g", 3),
        ("-w --use-server -v", "-w -v", 1),
        ("--bpf", "--runtime=bpf", 0),
        ("", "", 0),
    ],
)
def test_pack_writes_compile_options_only_and_unpack_accepts_them(
    options: str, expected: str, left_out: int
) -> None:
    text, dropped = archive_conf(script(options, ("base",)))
    assert len(dropped) == left_out
    assert check_conf_file("conf.d/tick.conf", text, {"tick", "base"}) == ("base",)
    lines = text.splitlines()
    written = split_options(split_options(lines[1].partition("=")[2])[0])
    assert parse_options(written) == parse_options(split_options(expected))
    assert lines[2] == "tick_REQ=base"
    # The target computes the same options as the cache record holds.
    record_options = recorded_options(script(options).options)
    assert recorded_options(parse_options(split_options(expected))) == record_options


def test_pack_refuses_compile_options_that_name_files() -> None:
    with pytest.raises(PackError, match="tick_OPT: -I /srv/tapsets is not one of"):
        archive_conf(script("--runtime=bpf -I /srv/tapsets"))


def record(release: str, machine: str) -> Blob:
    return Blob.of(CacheRecord(KernelIdentity(release, "", machine), "bpf", ()).to_text().encode())


def test_unpack_installs_the_releases_installed_here_for_this_machine() -> None:
    files = {
        f"cache/{RELEASE}/a.opts": record(RELEASE, "x86_64"),
        "cache/5.10.0-9/a.opts": record("5.10.0-9", "x86_64"),
        "cache/6.12.0-1/a.opts": record("6.12.0-1", "aarch64"),
    }
    manifest = make_manifest((RELEASE, "5.10.0-9", "6.12.0-1"), files)
    chosen, skipped = match_host(manifest, files, {RELEASE, "6.12.0-1"}, "x86_64")
    assert chosen == [RELEASE]
    assert skipped == {
        "5.10.0-9": "not installed on this host",
        "6.12.0-1": "built for aarch64, this host is x86_64",
    }
    with pytest.raises(PackError, match=r"no release in the archive is for this host \(6.1"):
        match_host(manifest, files, {"6.12.0-1"}, "x86_64")


WORDS = st.sampled_from(
    [
        *("-c", "-o", "-x", "-S", "-s", "-I", "-D", "-g", "-v", "-B", "-T", "-F", "-", "--"),
        *("--runtime=bpf", "--runtime", "kmod", "--bpf", "--remote", "--privilege=stapusr"),
        *("-DX=1", "-oFILE", "-vc", "-gI/tmp", "/tmp/x", "id", "1", "X=$y", "'a b'", '"-c id"'),
    ]
)


@given(st.lists(WORDS, max_size=6))
def test_whatever_an_archive_may_set_runs_nothing_and_names_no_file(words: list[str]) -> None:
    value = " ".join(words)
    try:
        check_conf_file("conf.d/tick.conf", f"tick_OPT={shlex.quote(value)}\n", {"tick"})
    except PackError as refused:
        assert "\n" not in str(refused)
        return
    parsed = parse_options(split_options(value))
    assert start_options(parsed) == start_options([])  # no -o, -c, -x, -S, -s
    assert not any("/" in word or "$" in word for option in parsed for word in option.words)
