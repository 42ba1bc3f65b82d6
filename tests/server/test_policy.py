"""The server's option policy and the stap command line it builds (pure)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapinit.protocol import CompileRequest, ProtocolError, Tapset, check_module_name
from stapinit.server.policy import (
    ParsedOptions,
    PolicyError,
    check_request,
    module_file_name,
    parse_compile_options,
    stap_command,
    string_literals,
)

RELEASES = ("6.1.0-56-amd64", "6.18.44-fc")
REQ = CompileRequest(
    script_text="probe begin { exit() }",
    script_name="hello.stp",
    release=RELEASES[0],
    arch="x86_64",
)


def _usr(option: str) -> str:
    return f"You can't specify {option} when --privilege=stapusr is specified."


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ((), ()),
        (("-v", "-w"), ("-v", "-w")),
        (("-vvv",), ("-v", "-v", "-v")),
        (("-vs4",), ("-v", "-s4")),
        (("-s", "4"), ("-s4",)),
        (("-G", "x=1"), ("-Gx=1",)),
        (("-E", "probe end {}"), ("-Eprobe end {}",)),
        (("--vp", "0001"), ("--vp=0001",)),
        (("--compatible=4.0",), ("--compatible=4.0",)),
        (("--skip-badvars", "-u"), ("--skip-badvars", "-u")),
        (("-T", "5"), ("-T5",)),
    ],
)
def test_accepted_options_are_canonical(
    options: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    for stapusr in (False, True):
        assert parse_compile_options(options, stapusr, "kmod").options == expected


@pytest.mark.parametrize(
    ("options", "signed"),
    [
        (("-v", "-w", "-q", "--vp", "01", "--vp=1", "--check-version"), ()),
        (("-u", "-w", "-D", "X=1", "-T5"), ("-u", "-D", "X=1", "-T5")),
        (("-vu", "-wvDX=1", "-vs", "4"), ("-u", "-DX=1", "-s", "4")),
        (("--compatible", "4.0", "--bpf", "--runtime=kmod"), ("--compatible", "4.0")),
        (("-w", "arg 1"), ("arg 1",)),
    ],
)
def test_the_signature_leaves_out_what_only_changes_the_output(
    options: tuple[str, ...], signed: tuple[str, ...]
) -> None:
    # As the client spelled them, less report-only options and the runtime selection.
    assert parse_compile_options(options, False, "kmod").signed == signed


def test_script_arguments_are_kept_apart() -> None:
    parsed = parse_compile_options(("-v", "arg1", "second arg"), False, "kmod")
    assert parsed.options == ("-v",)
    assert parsed.script_args == ("arg1", "second arg")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (("-g",), "-g"),
        (("-wg",), "-g"),
        (("-D", "X=1"), "-D"),
        (("-DX=1",), "-D"),
        (("-B", "CC=sh"), "-B"),
        (("-R", "/etc"), "-R"),
        (("--tmpdir=/tmp",), "--tmpdir"),
        (("--tmpdir", "/tmp"), "--tmpdir"),
        (("-m", "x"), "-m"),
        (("-I", "/usr/share"), "-I"),
        (("--modinfo", "a=b"), "--modinfo"),
        (("--suppress-time-limits",), "--suppress-time-limits"),
    ],
)
def test_stapusr_refusals_use_stap_wording(options: tuple[str, ...], named: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_compile_options(options, True, "bpf")
    assert str(err.value) == _usr(named)


def test_stapdev_may_use_guru_mode_and_defines() -> None:
    parsed = parse_compile_options(
        ("-g", "-D", "MAXACTION=10000", "--suppress-time-limits"), False, "kmod"
    )
    assert parsed.options == ("-g", "-DMAXACTION=10000", "--suppress-time-limits")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("-B", "CC=/bin/sh"), "option -B is not accepted"),  # runs commands on the server
        (("-R", "/etc"), "option -R is not accepted"),
        (("-o", "/etc/passwd"), "option -o is not accepted"),
        (("-d", "/etc/shadow"), "option -d is not accepted"),
        (("-c", "rm -rf /"), "option -c is not accepted"),
        (("-k",), "option -k is not accepted"),
        (("--use-server",), "option --use-server is not accepted"),
        (("--sysroot=/",), "option --sysroot is not accepted"),
        (("--run=bpf",), "option --run is not accepted"),  # no abbreviations
        (("-",), "standard input"),
        (("-p", "2"), "option -p must not be among the options"),
        (("-r", "x"), "option -r must not be among the options"),
        (("--privilege=stapdev",), "option --privilege must not be among the options"),
        (("--unprivileged",), "option --unprivileged must not be among the options"),
        (("-s",), "needs a value"),
        (("-s", "lots"), "invalid value 'lots' for option -s"),
        (("-D", ""), "invalid value"),
        (("-D", "1=x"), "invalid value"),
        (("--runtime=dyninst",), "invalid value 'dyninst'"),
        (("--bpf=yes",), "takes no value"),
    ],
)
def test_refused_for_everyone(options: tuple[str, ...], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_compile_options(options, False, "kmod")


def test_value_that_looks_like_an_option_stays_a_value() -> None:
    # getopt reads "-D -g" as -D with value "-g"; re-emitted attached, stap agrees.
    with pytest.raises(PolicyError, match="invalid value '-g'"):
        parse_compile_options(("-D", "-g"), False, "kmod")
    assert parse_compile_options(("-E", "-g"), True, "kmod").options == ("-E-g",)


@pytest.mark.parametrize("options", [("--runtime=bpf",), ("--runtime", "bpf"), ("--bpf",)])
def test_runtime_option_selects_bpf(options: tuple[str, ...]) -> None:
    parsed = parse_compile_options(options, False, "kmod")
    assert parsed == ParsedOptions((), (), "bpf", ())


def test_release_and_arch_must_be_served() -> None:
    with pytest.raises(PolicyError) as err:
        check_request(dataclasses.replace(REQ, release="2.6.32"), RELEASES, "x86_64")
    assert str(err.value) == (
        "kernel release 2.6.32 is not supported by this server; "
        "it compiles for: 6.1.0-56-amd64, 6.18.44-fc"
    )
    with pytest.raises(PolicyError, match="architecture aarch64 is not supported"):
        check_request(dataclasses.replace(REQ, arch="aarch64"), RELEASES, "x86_64")


def test_stapusr_module_name_and_tapsets_refused() -> None:
    usr = dataclasses.replace(REQ, privilege="stapusr")
    assert check_request(usr, RELEASES, "x86_64") == ParsedOptions((), (), "kmod", ())
    with pytest.raises(PolicyError) as err:
        check_request(dataclasses.replace(usr, module_name="m"), RELEASES, "x86_64")
    assert str(err.value) == _usr("-m")
    with pytest.raises(PolicyError) as err:
        check_request(dataclasses.replace(usr, tapsets=(Tapset("a.stp", ""),)), RELEASES, "x86_64")
    assert str(err.value) == _usr("-I")


# Every way a stap script can hand @cast (or @enumname) a header, as tried against
# the real stap 4.8: each made gcc include the file.
_HEADER_SCRIPTS = [
    'probe begin { println(@cast(0, "task_struct", "</var/log/x.log>")->pid) }',
    'probe begin { println(@cast(0, "task_struct", "kernel</etc/x>")->pid) }',
    'probe begin { println(@cast(0, "task_struct", "kernel:</etc/x>")->pid) }',
    'probe begin { println(@cast(0, "task_struct", "</var/" "log/x>")->pid) }',
    'probe begin { println(@cast(0, "t", "ker" "nel<" "/etc/x>")->pid) }',
    '@define h %( "</etc/x>" %)\nprobe begin { println(@cast(0, "task_struct", @h)->pid) }',
    'probe begin { println(@cast(0, "t", %( 1 == 1 %? "</etc/x>" %: "kernel" %))->pid) }',
    'probe begin { println(@enumname(0, "t", "<linux/x.h>")) }',
    'probe begin { println(@cast(0, "t", "<linux/sched.h>")->pid) } # "',
    'probe begin { println(@cast(0, "t", "<a\\\n/etc/x>")->pid) }',
]


@pytest.mark.parametrize("script", _HEADER_SCRIPTS)
def test_stapusr_header_arguments_are_refused(script: str) -> None:
    usr = dataclasses.replace(REQ, privilege="stapusr", script_text=script)
    with pytest.raises(PolicyError, match=r"header files .* not allowed under --privilege=stapusr"):
        check_request(usr, RELEASES, "x86_64")
    # stapdev may (its compile is confined by the sandbox like every other).
    check_request(dataclasses.replace(usr, privilege="stapdev"), RELEASES, "x86_64")


@pytest.mark.parametrize(
    "changes",
    [
        {"options": ("-E", 'probe end { println(@cast(0, "t", "</etc/x>")->pid) }')},
        {"script_text": 'probe begin { println(@cast(0, "t", @1)->pid) }', "options": ("</x>",)},
        {"script_text": 'probe begin { println(@cast(0, "t", @1 "x>")->pid) }', "options": ("k<",)},
        # $1 spliced in as a token, quotes and all, next to the rest of the name.
        {
            "script_text": 'probe begin { println(@cast(0, "t", "kernel" $1 "linux/x.h>")->pid) }',
            "options": ('"<"',),
        },
    ],
)
def test_stapusr_headers_from_options_and_arguments_are_refused(changes: dict[str, object]) -> None:
    usr = dataclasses.replace(REQ, privilege="stapusr", **changes)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="header files"):
        check_request(usr, RELEASES, "x86_64")


@pytest.mark.parametrize(
    "script",
    [
        'probe begin { printf("<%d> a < b <= c\\n", 1 < 2) }',
        'probe begin { println("x") } # "</etc/x>" in a comment',
        'probe begin { println("x") } // "</etc/x>"\n/* "<y>" */',
        'probe begin { println(@cast(0, "task_struct", "kernel")->pid) }',
        'probe begin { println("\\074/etc/x>") }',  # stap does not decode escapes
    ],
)
def test_stapusr_strings_that_name_no_header_pass(script: str) -> None:
    usr = dataclasses.replace(REQ, privilege="stapusr", script_text=script)
    check_request(usr, RELEASES, "x86_64")


def test_string_literals_are_read_as_stap_reads_them() -> None:
    script = 'a "one" # "comment"\nb "t\\"wo" // "c"\n/* "c2" */ %{ "c" %} "th\\\nree" "open\n"x"'
    assert string_literals(script) == ["one", 't\\"wo', "th\\\nree", "open", "x"]


def test_stap_command_for_a_file() -> None:
    req = dataclasses.replace(REQ, privilege="stapusr", options=("-v", "arg"))
    parsed = check_request(req, RELEASES, "x86_64")
    assert stap_command("/usr/bin/stap", req, parsed, None) == [
        "/usr/bin/stap",
        "-v",
        "-p4",
        "--disable-cache",
        "-r",
        RELEASES[0],
        "--privilege=stapusr",
        "--",
        "hello.stp",
        "arg",
    ]


def test_stap_command_for_eval_with_tapsets_and_name() -> None:
    req = dataclasses.replace(
        REQ,
        script_name=None,
        eval=True,
        runtime="bpf",
        module_name="hello",
        tapsets=(Tapset("a.stp", ""),),
    )
    parsed = check_request(req, RELEASES, "x86_64")
    assert stap_command("stap", req, parsed, "/w/tapsets") == [
        "stap",
        "--runtime=bpf",
        "-p4",
        "--disable-cache",
        "-r",
        RELEASES[0],
        "-m",
        "hello",
        "-I",
        "/w/tapsets",
        "--",
        "-",  # on standard input: no size limit, and to stap the same as -e
    ]


def test_module_file_name() -> None:
    assert module_file_name("anything\n", "hello", "bpf") == "hello.bo"
    assert module_file_name("stap_123.ko\n", None, "kmod") == "stap_123.ko"
    assert module_file_name("warning\nstap_9.bo\n", None, "bpf") == "stap_9.bo"
    for bad in ("", "../x.ko\n", "stap_1.bo\n", "/tmp/x.ko\n", "Evil.ko\n"):
        assert module_file_name(bad, None, "kmod") is None


def test_module_names_follow_the_protocol() -> None:
    # One rule for a name the client asks for and a name read from stap's output.
    longest = "m" * 55
    check_module_name(longest)
    assert module_file_name(f"{longest}.ko\n", None, "kmod") == f"{longest}.ko"
    with pytest.raises(ProtocolError):
        check_module_name(longest + "m")
    assert module_file_name(f"{longest}m.ko\n", None, "kmod") is None


_words = st.lists(st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"])))


@given(options=_words, script=st.text(), privilege=st.sampled_from(["stapusr", "stapdev"]))
def test_any_options_and_script_are_accepted_or_refused_cleanly(
    options: list[str], script: str, privilege: str
) -> None:
    req = dataclasses.replace(
        REQ,
        options=tuple(options),
        script_text=script,
        privilege=privilege,  # type: ignore[arg-type]
    )
    try:
        parsed = check_request(req, RELEASES, "x86_64")
    except PolicyError as exc:
        assert "\n" not in str(exc)
    else:
        assert stap_command("stap", req, parsed, None)[0] == "stap"
