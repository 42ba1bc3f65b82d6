"""The configuration parser on hand-written cases; each value is also checked against real bash."""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stapinit.core.bashvars import ConfigError, parse_assignments
from stapinit.core.errors import ConfigFileError
from tests.core.bash_oracle import bash_source, our_values

ROOT = pwd.getpwuid(0)
ENV = {"HOME": "/home dir", "X": "1  2", "EMPTY": "", "USERNAME": ROOT.pw_name}


def values(text: str, env: dict[str, str] | None = None) -> dict[str, str]:
    return {a.name: a.value for a in parse_assignments(text, "f.conf", env or {})}


# (file text, expected values with ENV as the environment); None means unset.
BASH_CASES: list[tuple[str, Mapping[str, str | None]]] = [
    (
        'A=plain\nB="double $A ${A}x \\"q\\" \\$ \\\\ \\z"\n'
        "C='single $A \\n'\nD=back\\ sl\\$\nE=\n",
        {"A": "plain", "B": 'double plain plainx "q" $ \\ \\z', "C": "single $A \\n"}
        | {"D": "back sl$", "E": ""},
    ),
    (
        'F="multi\nline" G=a\\\nb H="c\\\nd" I=\'e\\\nf\'',
        {"F": "multi\nline", "G": "ab", "H": "cd", "I": "e\\\nf"},
    ),
    ("A=1 B=$A; C=x#y D=$X # comment\n", {"A": "1", "B": "1", "C": "x#y", "D": "1  2"}),
    # Every word of a declaration builtin is expanded before any is assigned.
    ("A=0\nexport A=1 B=$A\ndeclare C=2 D=$C\ntypeset E=3 F=$E", {"B": "0", "D": "", "F": ""}),
    ("A=x; export A+=y B=$A; C+=z; X+=3", {"A": "xy", "B": "x", "C": "z", "X": "1  23"}),
    ("export NEW; declare OTHER; export X", {"NEW": None, "OTHER": None, "X": "1  2"}),
    (
        'A=$ B=$/ C=a$ D="$" E="$\'x\'" F=${U:-$}',
        {"A": "$", "B": "$/", "C": "a$", "D": "$"} | {"E": "$'x'", "F": "$"},
    ),
    # Tilde: value start, after ':' (not after a later '='), also after += and in export.
    (
        'A=~/x B=~ C=a:~/q:~:x D=b=~/x E=x~ F="~" G=\\~ H=~nosuchuser/x',
        {"A": "/home dir/x"}
        | {"B": "/home dir", "C": "a:/home dir/q:/home dir:x", "D": "b=~/x", "E": "x~", "F": "~"}
        | {"G": "~", "H": "~nosuchuser/x"},
    ),
    (
        f"A=~{ROOT.pw_name}/x B=~{ROOT.pw_name}:y C=~'{ROOT.pw_name}'"
        f" D=~$USERNAME/z E=~{ROOT.pw_name}}}",
        {"A": f"{ROOT.pw_dir}/x", "B": f"{ROOT.pw_dir}:y", "C": f"~{ROOT.pw_name}"}
        | {"D": f"~{ROOT.pw_name}/z", "E": f"~{ROOT.pw_name}}}"},
    ),
    (
        "export A=~/a:~/b; HOME=/new; B=~; L=x; L+=~/y; M=a\\:~/x",
        {"A": "/home dir/a:/home dir/b"} | {"B": "/new", "L": "x/new/y", "M": "a:~/x"},
    ),
    # Parameter expansion operators, set / empty / unset.
    (
        "A=${X:-d} B=${EMPTY:-d} C=${EMPTY-d} D=${U-d} E=${X:+a} F=${EMPTY:+a} G=${EMPTY+a}"
        " H=${U+a} I=${#X} J=${#U} K=${U:-a b;c|d&e<f>g(h)#i}",
        {"A": "1  2", "B": "d", "C": "", "D": "d", "E": "a", "F": "", "G": "a", "H": ""}
        | {"I": "4", "J": "0", "K": "a b;c|d&e<f>g(h)#i"},
    ),
    (
        'A=${U:=~/f} B=${EMPTY:=v} C=${X:=no} D=${V="$A"}',
        {"A": "/home dir/f", "U": "/home dir/f"}
        | {"B": "v", "EMPTY": "v", "C": "1  2", "D": "/home dir/f", "V": "/home dir/f"},
    ),
    (
        'A=${U:-~/d} B="${U:-~/d}" C=${U:-a:~/e} D=${U:-\'~\'} E=${U:-\\}} F="${U:-\\}\\x}"'
        ' G=${U:-"a b"} H=${U:-${V:-~}} I=~${U:-/x} J=~/${U:-x}'
        f" K=${{V=a:~}} L=${{W:=~{ROOT.pw_name}:~}} M=${{X:+a:~}}"
        f" N=${{U-~;}} O=${{U-~{ROOT.pw_name} }}",
        {"A": "/home dir/d", "B": "~/d", "C": "a:/home dir/e", "D": "~", "E": "}", "F": "}\\x"}
        | {"G": "a b", "H": "/home dir", "I": "~/x", "J": "/home dir/x"}
        | {"K": "a:~", "V": "a:~", "L": f"{ROOT.pw_dir}:~", "W": f"{ROOT.pw_dir}:~"}
        | {"M": "a:/home dir", "N": "~;", "O": f"~{ROOT.pw_name} "},
    ),
    # An unused word is not expanded: no assignment, no error.
    ("A=${X:-${V:=no}} B=${X:-${U:?boom}} C=${U:+${W:=no}}", {"A": "1  2", "V": None, "W": None}),
    ("if=1 export=2 X_1=3\r\n", {"if": "1", "export": "2", "X_1": "3\r"}),
]


@pytest.mark.parametrize(("text", "expected"), BASH_CASES)
def test_values_are_those_bash_gives(
    text: str, expected: Mapping[str, str | None], tmp_path: Path
) -> None:
    names = sorted(expected)
    assert our_values(text, ENV, names) == dict(expected)
    bash = bash_source(text, ENV, names, tmp_path)
    assert (bash.returncode, bash.stderr) == (0, "")
    assert bash.values == dict(expected)


def test_tilde_without_home_uses_the_password_database(tmp_path: Path) -> None:
    home = pwd.getpwuid(os.getuid()).pw_dir
    assert our_values("A=~/x", {}, ["A"]) == {"A": f"{home}/x"}
    assert bash_source("A=~/x", {}, ["A"], tmp_path).values == {"A": f"{home}/x"}
    assert values("A=~/x", {"HOME": ""}) == {"A": "/x"}


def test_default_assignment_is_reported_where_it_happens() -> None:
    found = parse_assignments("\nA=${B:=1}${B:=2} C+=x", "f", {"C": "c"})
    assert [(a.name, a.value, a.line) for a in found] == [
        ("B", "1", 2),
        ("A", "11", 2),
        ("C", "cx", 2),
    ]


def test_environment_and_earlier_files_are_seen() -> None:
    assert values("A=$HOME/x B=${NOPE}y", {"HOME": "/root"}) == {"A": "/root/x", "B": "y"}
    assert values('SCRIPT_PATH=/a\nX_OPT="-o $SCRIPT_PATH/out"')["X_OPT"] == "-o /a/out"


def test_line_numbers_are_recorded() -> None:
    found = parse_assignments("\n\nA=1\nB='x\ny'\nC=3 \\\n D=4", "f", {})
    assert [(a.name, a.line) for a in found] == [("A", 3), ("B", 4), ("C", 6), ("D", 7)]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("A=1\necho hi\n", 2, "not an assignment: 'echo'"),
        ("A=1 cmd\n", 1, "not an assignment: 'cmd' (bash would run it"),
        ("A=1 export B=2\n", 1, "not an assignment: 'export'"),
        ("A=$(id)\n", 1, "command substitution"),
        ("A=$((1+2))\n", 1, "arithmetic"),
        ("A=$[1+2]\n", 1, "arithmetic"),
        ("A=`id`\n", 1, "command substitution"),
        ('A="x `id`"\n', 1, "command substitution"),
        ("if true; then A=1; fi\n", 1, "not an assignment: 'if'"),
        ("{ A=1; }\n", 1, "not an assignment: '{'"),
        ("A=1 && B=2\n", 1, "only assignments"),
        ("A=1 | cat\n", 1, "only assignments"),
        ("A=1 &\n", 1, "only assignments"),
        ("A=1 > /tmp/x\n", 1, "only assignments"),
        ("A=x<y\n", 1, "only assignments"),
        ("A=(1 2)\n", 1, "arrays"),
        ("; A=1\n", 1, "no command before it"),
        ("A=1;;\n", 1, "no command before it"),
        ('A=1\nB="open\n', 2, "unterminated double quote"),
        ("A='open\n", 1, "unterminated single quote"),
        ("A=${B:-x\n", 1, "unterminated ${"),
        ("A=${B#x}\n", 1, "unsupported parameter expansion ${B#"),
        ("A=${B:1}\n", 1, "unsupported parameter expansion ${B:1"),
        ("A=${B/x/y}\n", 1, "unsupported parameter expansion"),
        ("A=${!B}\n", 1, "unsupported parameter expansion"),
        ("A=${B[0]}\n", 1, "unsupported parameter expansion"),
        ("A=${#}\n", 1, "unsupported parameter expansion"),
        ("A=${#B:-x}\n", 1, "unsupported parameter expansion"),
        ("A=$1\n", 1, "special parameter $1"),
        ("A=$@\n", 1, "special parameter $@"),
        ('A="$?"\n', 1, "special parameter $?"),
        ("A=$'x\\ty'\n", 1, "unsupported quoting $'...'"),
        ('A=$"x"\n', 1, 'unsupported quoting $"..."'),
        ("\nA=${U:?not configured}\n", 2, "U: not configured"),
        ("A=${EMPTY:?}\n", 1, "EMPTY: parameter null or not set"),
        ("A=${#B}\n", 1, "depends on the locale"),
        ("A=~+/x\n", 1, "directory stack"),
        ("A=~-\n", 1, "directory stack"),
        ("A=~2\n", 1, "directory stack"),
        ("A=$RANDOM\n", 1, "$RANDOM is bash's own variable"),
        ("A=${PWD}\n", 1, "$PWD is bash's own variable"),
        ("A=${#BASH_VERSION}\n", 1, "$BASH_VERSION is bash's own variable"),
        ("IFS=:\n", 1, "IFS is a variable bash maintains"),
        ("A=${SHLVL:=1}\n", 1, "SHLVL is a variable bash maintains"),
        ("A=$PATH\n", 1, "$PATH is not set (bash would supply"),
        ("readonly A=1\n", 1, "readonly is not supported"),
        ("local A=1\n", 1, "only valid inside a function"),
        ("export -n A\n", 1, "options of export"),
        ("export\n", 1, "export without names"),
        ("export A=1 'B'=2\n", 1, "export: not a variable name: \"'B'=2\""),
        ("export A={a,b}\n", 1, "brace-expands"),
        ("A=${U:-{x}}\n", 1, "bash pairs it"),
        ("A=${U:-<(id)}\n", 1, "process substitution"),
        ('A="${U:->(id)}"\n', 1, "process substitution"),
        ("A=${U:-x>\\\n(id)}\n", 1, "process substitution"),
        ('A="${U:-"x"}"\n', 1, "ambiguous"),
        ("A=\"${U:-'x'}\"\n", 1, "ambiguous"),
        ("A=1\nB=2\0\n", 2, "NUL byte"),
        ("A=1\nB='x\ny'\\", 3, "backslash at the end of the file"),
    ],
)
def test_anything_else_is_refused_with_file_and_line(text: str, line: int, words: str) -> None:
    env = {"B": "\u00e9", "EMPTY": ""}
    with pytest.raises(ConfigError) as caught:
        parse_assignments(text, "/etc/systemtap/conf.d/x.conf", env)
    assert caught.value.line == line
    assert str(caught.value).startswith(f"/etc/systemtap/conf.d/x.conf:{line}: ")
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_refusal_is_a_config_file_error_with_exit_code_6() -> None:
    with pytest.raises(ConfigFileError) as caught:
        parse_assignments("echo hi", "x.conf", {})
    assert isinstance(caught.value, ConfigError)
    assert caught.value.exit_code == 6


def test_a_path_set_in_the_file_may_be_read() -> None:
    assert values("PATH=/sbin; A=$PATH:/bin") == {"PATH": "/sbin", "A": "/sbin:/bin"}
    assert values("A=${PATH:-/bin}", {"PATH": "/usr/bin"}) == {"A": "/usr/bin"}


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("AB_=+$'\"\\ \n#;:~{}()`x1-|&<>\0"))))
def test_arbitrary_input_parses_or_reports_file_and_line(text: str) -> None:
    try:
        parse_assignments(text, "g.conf", {"A": "a"})
    except ConfigError as error:
        assert str(error).startswith(f"g.conf:{error.line}: ")
        assert 1 <= error.line <= text.count("\n") + 1
        assert "\n" not in str(error)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_arbitrary_unicode_never_crashes(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_assignments(text, "g.conf", {})


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_characters="'\0", exclude_categories=["Cs"])))
def test_single_quoted_values_round_trip(value: str) -> None:
    assert values(f"V='{value}'") == {"V": value}
