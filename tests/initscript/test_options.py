from __future__ import annotations

import pytest

from stapinit.core.runtime import LoadOptions
from stapinit.initscript.options import (
    OptionError,
    compile_options,
    parse_options,
    runtime_of,
    split_options,
    start_options,
)


def test_split_keeps_quoted_words_together() -> None:
    assert split_options("-o '/var/log/my out' -DNAME=\"a b\"") == [
        "-o",
        "/var/log/my out",
        "-DNAME=a b",
    ]


def test_unbalanced_quote_is_an_error() -> None:
    with pytest.raises(OptionError, match="quotation"):
        split_options("-o 'open")


def test_compile_filter_drops_the_spec_list_with_arguments() -> None:
    words = split_options(
        "-p4 -m mod -r 6.1 -c 'ls -l' -x 12 -e 'probe x' -s 8 -o /out -h -V -k "
        "-v -DRELAY_HOST=g1 -I /tap -g --runtime=bpf"
    )
    assert compile_options(parse_options(words)) == [
        "-v",
        "-D",
        "RELAY_HOST=g1",
        "-I",
        "/tap",
        "-g",
    ]


def test_attached_and_clustered_short_options() -> None:
    options = parse_options(["-vko/tmp/x", "-p4"])
    assert [(o.flag, o.value) for o in options] == [
        ("v", None),
        ("k", None),
        ("o", "/tmp/x"),
        ("p", "4"),
    ]


def test_stray_argument_and_missing_argument_are_errors() -> None:
    with pytest.raises(OptionError, match=r"unexpected argument 'file\.stp'"):
        parse_options(["-v", "file.stp"])
    with pytest.raises(OptionError, match="-o needs an argument"):
        parse_options(["-o"])


def test_runtime_selection() -> None:
    assert runtime_of(parse_options(["--runtime=bpf"])) == "bpf"
    assert runtime_of(parse_options(["--bpf"])) == "bpf"
    assert runtime_of(parse_options(["--runtime=bpf", "--runtime=kernel"])) == "kmod"
    assert runtime_of(parse_options(["-v"])) == "kmod"


def test_start_filter_keeps_only_what_the_loader_takes() -> None:
    options = parse_options(
        split_options("-v -o /log/out -S 2,4 -s 16 -c 'a b' -x 7 -DX=1 -I /t -g -b -F --vp 01")
    )
    assert start_options(options) == LoadOptions("/log/out", "2,4", "16", "a b", "7")


def test_bad_buffer_size_is_an_error() -> None:
    with pytest.raises(OptionError, match="-s 0"):
        start_options(parse_options(["-s", "0"]))
