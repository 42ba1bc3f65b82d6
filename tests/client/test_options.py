"""stap-client's command line, parsed without running anything."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapinit.client.options import (
    ClientOptions,
    ClientUsageError,
    parse_args,
    parse_server,
)
from stapinit.trust.address import ServerAddress

HELLO = 'probe begin { printf ("Hello\\n"); exit (); }'


def parse(*argv: str) -> ClientOptions:
    return parse_args(list(argv), 9740)


def test_spec_examples() -> None:
    assert parse("-e", HELLO) == ClientOptions(script_text=HELLO)
    assert parse("-e", HELLO, "--unprivileged") == ClientOptions(
        script_text=HELLO, privilege="stapusr"
    )
    assert parse("-e", HELLO, "-p4") == ClientOptions(script_text=HELLO, compile_only=True)
    assert parse("-e", HELLO, "-p4", "--unprivileged") == ClientOptions(
        script_text=HELLO, compile_only=True, privilege="stapusr"
    )


def test_every_option() -> None:
    opts = parse(
        "-v", "-vv", "-p", "4", "-m", "mymod", "-o", "out.txt", "-I", "a", "-Ib",
        "--runtime", "bpf", "--privilege=stapusr", "-r", "6.1.0-x", "--server=h:1",
        "--server", "[::1]", "script.stp", "arg1", "arg2",
    )  # fmt: skip
    assert opts == ClientOptions(
        script_file="script.stp",
        script_args=("arg1", "arg2"),
        compile_only=True,
        module_name="mymod",
        output_file="out.txt",
        verbose=3,
        include_dirs=("a", "b"),
        runtime="bpf",
        privilege="stapusr",
        release="6.1.0-x",
        servers=(ServerAddress("h", 1), ServerAddress("::1", 9740)),
    )


def test_options_after_the_script_and_double_dash() -> None:
    opts = parse("script.stp", "-p4", "--", "-v", "x")
    assert opts.script_file == "script.stp" and opts.compile_only
    assert opts.script_args == ("-v", "x") and opts.verbose == 0


def test_with_e_operands_are_script_arguments() -> None:
    assert parse("-e", HELLO, "one", "two").script_args == ("one", "two")


def test_p5_is_the_default_run() -> None:
    assert not parse("-p5", "-e", HELLO).compile_only


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        ([], "no script given"),
        (["-p3", "-e", "x"], "-p3 is not supported"),
        (["-m", "Bad-Name", "-e", "x"], "invalid module name"),
        (["--privilege=stapsys", "-e", "x"], "stapsys is not supported"),
        (["--privilege=root", "-e", "x"], "invalid privilege level 'root'"),
        (["--runtime=dyninst", "-e", "x"], "unsupported runtime 'dyninst'"),
        (["-e", "x", "-e", "y"], "-e given more than once"),
        (["-x", "-e", "x"], "option -x not recognized"),
        (["--bogus", "-e", "x"], "option --bogus not recognized"),
        (["-e"], "option -e requires argument"),
        (["--server=h:0", "-e", "x"], "invalid port"),
    ],
)
def test_usage_errors(argv: list[str], match: str) -> None:
    with pytest.raises(ClientUsageError, match=match):
        parse(*argv)


def test_help() -> None:
    assert parse("--help").help and parse("-e", "x", "-h").help


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server", ServerAddress("server", 9740)),
        ("server:123", ServerAddress("server", 123)),
        ("127.0.0.1:65535", ServerAddress("127.0.0.1", 65535)),
        ("[::1]:5", ServerAddress("::1", 5)),
        ("[::1]", ServerAddress("::1", 9740)),
    ],
)
def test_server_addresses(text: str, expected: ServerAddress) -> None:
    assert parse_server(text, 9740) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":5",
        "h:",
        "h:x",
        "h:65536",
        "::1",
        "[::1",
        "[nothost]:5",
        "[::1]x",
        "h:-1",
        "h:" + "9" * 5000,
    ],
)
def test_bad_server_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_server(text, 9740)


@given(st.integers(min_value=1, max_value=65535))
def test_server_address_round_trips(port: int) -> None:
    for host in ("example.org", "192.0.2.1", "2001:db8::1"):
        address = ServerAddress(host, port)
        assert parse_server(str(address), 1) == address
