from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stapinit.core.bashvars import ConfigError, parse_assignments


def values(text: str, env: dict[str, str] | None = None) -> dict[str, str]:
    return {a.name: a.value for a in parse_assignments(text, "f.conf", env or {})}


def test_plain_quoted_and_escaped_values() -> None:
    text = (
        "A=plain\n"
        'B="double $A ${A}x \\"q\\" \\$ \\\\"\n'
        "C='single $A \\n'\n"
        "D=back\\ slash\\$\n"
        "E=\n"
        'F="multi\nline"\n'
    )
    assert values(text) == {
        "A": "plain",
        "B": 'double plain plainx "q" $ \\',
        "C": "single $A \\n",
        "D": "back slash$",
        "E": "",
        "F": "multi\nline",
    }


def test_export_comments_blank_lines_and_several_per_line() -> None:
    text = '# comment\n\n   export X=1 Y\nA=1 B=2 # trailing\nexport Z="$X$B"; W=w\n'
    assert values(text) == {"X": "1", "A": "1", "B": "2", "Z": "12", "W": "w"}


def test_environment_and_unset_names_expand_like_bash() -> None:
    assert values("A=$HOME/x B=${NOPE}y", {"HOME": "/root"}) == {"A": "/root/x", "B": "y"}


def test_later_assignment_sees_earlier_one() -> None:
    assert values('SCRIPT_PATH=/a\nX_OPT="-o $SCRIPT_PATH/out"')["X_OPT"] == "-o /a/out"


def test_line_numbers_are_recorded() -> None:
    found = parse_assignments("\n\nA=1\nB='x\ny'\nC=3", "f", {})
    assert [(a.name, a.line) for a in found] == [("A", 3), ("B", 4), ("C", 6)]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("A=1\necho hi\n", 2, "not an assignment: 'echo'"),
        ("A=$(id)\n", 1, "command substitution"),
        ("A=`id`\n", 1, "command substitution"),
        ('A="x `id`"\n', 1, "command substitution"),
        ("if true; then A=1; fi\n", 1, "not an assignment: 'if'"),
        ("A=1 && B=2\n", 1, "only assignments"),
        ("A=1 | cat\n", 1, "only assignments"),
        ("A=(1 2)\n", 1, "arrays"),
        ('A=1\nB="open\n', 2, "unterminated double quote"),
        ("A='open\n", 1, "unterminated single quote"),
        ("A=${B:-x}\n", 1, "unsupported parameter expansion"),
        ("A=$1\n", 1, "unsupported expansion"),
        ("A=1 cmd\n", 1, "not an assignment: 'cmd'"),
        ("A=1 > /tmp/x\n", 1, "only assignments"),
        ("A=$'x\\ty'\n", 1, "unsupported quoting $'...'"),
        ('A=$"x"\n', 1, 'unsupported quoting $"..."'),
    ],
)
def test_anything_but_assignments_is_refused_with_file_and_line(
    text: str, line: int, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_assignments(text, "/etc/systemtap/conf.d/x.conf", {})
    assert caught.value.line == line
    assert str(caught.value).startswith(f"/etc/systemtap/conf.d/x.conf:{line}: ")
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("AB_=$'\"\\ \n#;{}()`x1-|&<>"))))
def test_arbitrary_input_parses_or_reports_file_and_line(text: str) -> None:
    try:
        parse_assignments(text, "g.conf", {"A": "a"})
    except ConfigError as error:
        assert str(error).startswith("g.conf:")
        assert 1 <= error.line <= text.count("\n") + 1


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_arbitrary_unicode_never_crashes(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_assignments(text, "g.conf", {})


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_characters="'", exclude_categories=["Cs"])))
def test_single_quoted_values_round_trip(value: str) -> None:
    assert values(f"V='{value}'") == {"V": value}
