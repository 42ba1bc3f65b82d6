from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from stapinit.core.runtime import LoadOptions
from stapinit.initscript.options import (
    TABLE,
    Argument,
    OptionError,
    Phase,
    Row,
    compile_options,
    named_paths,
    parse_options,
    recorded_options,
    row_of,
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


# -- the phase table: one test per row ----------------------------------------

VALUES = {"S": "2,4", "x": "7", "s": "16", "c": "ls -l", "o": "/log/out", "--runtime": "bpf"}


def spelled(row: Row) -> tuple[list[str], list[str]]:
    """How a user may write ``row``'s option, and its canonical spelling."""
    value = VALUES.get(row.flag, "a=1")
    short = not row.flag.startswith("--")
    name = f"-{row.flag}" if short else row.flag
    if row.argument is Argument.NONE:
        return [name], [name]
    if short:
        return [f"{name}{value}"], [name, value]
    if row.argument is Argument.REQUIRED:
        return [name, value], [f"{name}={value}"]
    return [f"{name}={value}"], [f"{name}={value}"]


@pytest.mark.parametrize("row", TABLE, ids=lambda row: row.flag)
def test_every_option_goes_where_its_row_says(row: Row) -> None:
    written, canonical = spelled(row)
    if row.phase is Phase.REFUSED:
        with pytest.raises(OptionError, match=re.escape(row.why)):
            parse_options(written)
        return
    options = parse_options(["-DKEEP=1", *written])
    keep = ["-D", "KEEP=1"]
    compiled = compile_options(options)
    recorded = recorded_options(options)
    started = start_options(options)
    if row.phase is Phase.COMPILE:
        assert (compiled, recorded) == (keep + canonical, keep + canonical)
    elif row.phase is Phase.REPORT:
        assert (compiled, recorded) == (keep + canonical, keep)
    else:
        assert (compiled, recorded) == (keep, keep)
    if row.phase is Phase.RUN:
        assert started != LoadOptions() and canonical[-1] in started
    else:
        assert started == LoadOptions()
    assert runtime_of(options) == ("bpf" if row.phase is Phase.RUNTIME else "kmod")
    paths = named_paths(options)
    assert [(use, value) for _, value, use in paths] == (
        [(row.path, VALUES.get(row.flag, "a=1"))] if row.path else []
    )


def test_every_option_stap_lists_has_a_row(real_stap: Path) -> None:
    """Against the installed stap (4.8 here, 5.x on newer Debian): nothing is unknown."""
    done = subprocess.run([str(real_stap), "--help"], capture_output=True, text=True, timeout=60)
    listed = set()
    for line in (done.stdout + done.stderr).splitlines():
        if line.lstrip().startswith("-"):
            listed.update(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[A-Za-z])\b", line))
    assert len(listed) > 50
    for flag in sorted(listed):
        assert row_of(flag).flag.startswith(flag.lstrip("-") if len(flag) == 2 else flag), flag


def test_long_options_are_matched_as_getopt_long_does() -> None:
    # An unambiguous prefix is the option to stap: it must be to us too.
    [runtime] = parse_options(["--run=bpf"])
    assert (runtime.flag, runtime.words) == ("--runtime", ("--runtime=bpf",))
    assert runtime_of([runtime]) == "bpf"
    assert row_of("--target-namespace").flag == "--target-namespaces"  # as stap --help spells it
    assert row_of("--col").flag == "--color"  # --color and --colour are one option
    with pytest.raises(OptionError, match="ambiguous"):
        parse_options(["--dump"])
    with pytest.raises(OptionError, match="unknown stap option --nosuch"):
        parse_options(["--nosuch"])
    with pytest.raises(OptionError, match="unknown stap option -y"):
        parse_options(["-vy"])
    with pytest.raises(OptionError, match="takes no value"):
        parse_options(["--bpf=yes"])
    with pytest.raises(OptionError, match="unexpected argument '--'"):
        parse_options(["-v", "--", "arg"])


def test_run_time_values_are_checked_before_they_reach_the_loader() -> None:
    for words, message in (
        (["-S", "big"], "-S big: expected size"),
        (["-x", "self"], "-x self: expected a process id"),
        (["-c", ""], "-c: the command is empty"),
        (["-s", "0"], "-s 0"),
    ):
        # Only when that script starts: a bad value fails it alone.
        options = parse_options(words)
        with pytest.raises(OptionError, match=re.escape(message)):
            start_options(options)
    for words, message in (
        (["--runtime=dyninst"], "kernel or bpf"),
        (["--dyninst"], "dyninst runtime is not supported"),
        (["-o", "/log/a\0b"], "NUL"),
    ):
        with pytest.raises(OptionError, match=re.escape(message)):
            parse_options(words)


def test_equivalent_spellings_record_the_same_cache() -> None:
    one = recorded_options(parse_options(split_options("-DX=1 -I/t --privilege stapusr")))
    other = recorded_options(parse_options(split_options("-D X=1 -I /t --priv=stapusr")))
    assert one == other == ["-D", "X=1", "-I", "/t", "--privilege=stapusr"]
