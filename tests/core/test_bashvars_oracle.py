"""Property tests: for generated configuration files, our values are real bash's.

Files are generated from the accepted language (module docstring of
:mod:`stapinit.core.bashvars`): names, every quoting style, escapes, line
continuations, expansions and their operators, tilde prefixes, ``+=``,
declaration builtins, comments, bytes that are not UTF-8. Each is sourced by
``bash`` (``set -a``, in a controlled ``env -i`` environment) and every
variable must hold what the parser says. A second test feeds loosely
structured text and compares whenever the parser accepts it.
"""

from __future__ import annotations

import functools
import operator
import pwd
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stapinit.core.bashvars import ConfigError
from tests.core.bash_oracle import bash_source, our_values

ROOT_USER = pwd.getpwuid(0).pw_name
# Assigned names, and names only read (E and EMPTY come from the environment, U never set).
ASSIGNED = ["A", "B", "C", "HOME", "x_1", "if"]
READ = [*ASSIGNED, "E", "EMPTY", "U"]
ENVIRONMENTS = st.fixed_dictionaries(
    {"E": st.sampled_from(["e", "1  2", "a:~/b", "\u00e9"]), "EMPTY": st.just("")},
    optional={"HOME": st.sampled_from(["/home/h", "", "/with space"])},
)
# Refusals that depend on values, not on the grammar (the generator cannot avoid them).
DATA_REFUSALS = ("bash stops here", "depends on the locale", "directory stack")

BLANK = st.sampled_from([" ", "  ", "\t", " \\\n "])
LITERAL = st.text(alphabet="ab/.,-_@%+=!?*[]^\u00e9\udcff\r:#", min_size=1, max_size=4)
ESCAPED = st.sampled_from(list(" $\"'\\}~:#;&|()<>a=*")).map(lambda c: "\\" + c)
TILDE = st.sampled_from(
    [
        "~",
        "~/",
        f"~{ROOT_USER}",
        f"~{ROOT_USER}/",
        "~nosuchuser",
        "~:",
        ":~",
        ":~/",
        f":~{ROOT_USER}",
    ]
)
BARE_DOLLAR = st.sampled_from(["$/", "$.", "$%", "$:", "$="])
SINGLE = st.text(alphabet='ab $"\\}{~:#;\n\u00e9\udcff', max_size=5).map(lambda t: f"'{t}'")
OPERATOR = st.sampled_from(["-", ":-", "+", ":+", "=", ":="] * 3 + ["?", ":?"])
ASSIGNABLE = st.sampled_from(ASSIGNED)


def simple_expansion(name: str, braced: bool) -> str:
    return f"${{{name}}}" if braced else f"${name}"


@functools.cache
def double_quoted(depth: int) -> st.SearchStrategy[str]:
    """``"..."``: literals, escapes, expansions (quoted forms), continuations."""
    part = st.one_of(
        st.text(alphabet="ab :~'}{#;&|()<>=\n\u00e9", min_size=1, max_size=4),
        st.sampled_from(list('$`"\\az}')).map(lambda c: "\\" + c),
        st.just("\\\n"),
        st.just("$'"),
        expansion(depth, quoted=True),
    )
    return st.lists(part, max_size=4).map(lambda parts: '"' + "".join(parts) + '"')


@functools.cache
def expansion(depth: int, quoted: bool, declaration: bool = False) -> st.SearchStrategy[str]:
    """``$NAME``, ``${NAME}``, ``${#NAME}`` or ``${NAME<op>word}``."""
    simple = st.builds(simple_expansion, st.sampled_from(READ), st.booleans())
    length = st.sampled_from(READ).map(lambda n: f"${{#{n}}}")
    if depth <= 0:
        return st.one_of(simple, length)
    word = quoted_brace_word(depth - 1) if quoted else brace_word(depth - 1, declaration)

    @st.composite
    def operator(draw: st.DrawFn) -> str:
        op = draw(OPERATOR)
        name = draw(ASSIGNABLE if op.endswith("=") else st.sampled_from(READ))
        return f"${{{name}{op}{draw(word)}}}"

    return st.one_of(simple, length, operator())


@functools.cache
def brace_word(depth: int, declaration: bool) -> st.SearchStrategy[str]:
    """The word of ``${X:-w}`` outside double quotes."""
    part = st.one_of(
        st.text(alphabet="ab /:#;&|()=\n\u00e9", min_size=1, max_size=4),
        ESCAPED,
        TILDE,
        SINGLE,
        double_quoted(depth),
        expansion(depth, quoted=False, declaration=declaration),
    )
    return st.lists(part, max_size=3).map("".join)


@functools.cache
def quoted_brace_word(depth: int) -> st.SearchStrategy[str]:
    """The word of ``"${X:-w}"``."""
    part = st.one_of(
        st.text(alphabet="ab /:~#;&|()=\n\u00e9", min_size=1, max_size=4),
        st.sampled_from(list('$`"\\az}')).map(lambda c: "\\" + c),
        expansion(depth, quoted=True),
    )
    return st.lists(part, max_size=3).map("".join)


@functools.cache
def value(declaration: bool) -> st.SearchStrategy[str]:
    """An assignment value: a sequence of word parts."""
    literal = LITERAL if declaration else st.one_of(LITERAL, st.sampled_from(["{", "}", "{a,b}"]))
    part = st.one_of(
        literal,
        ESCAPED,
        TILDE,
        BARE_DOLLAR,
        SINGLE,
        st.just("\\\n"),
        double_quoted(2),
        expansion(2, quoted=False, declaration=declaration),
    )
    return st.lists(part, max_size=5).map("".join)


@functools.cache
def assignment(declaration: bool) -> st.SearchStrategy[str]:
    return st.builds(
        lambda name, op, val: f"{name}{op}{val}",
        ASSIGNABLE,
        st.sampled_from(["=", "+="]),
        value(declaration),
    )


@st.composite
def command(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        words = draw(st.lists(assignment(False), min_size=1, max_size=3))
        joined = words[0]
        for word in words[1:]:
            joined += draw(BLANK) + word
        return joined
    builtin = draw(st.sampled_from(["export", "declare", "typeset"]))
    arguments = draw(
        st.lists(st.one_of(assignment(True), st.sampled_from(READ)), min_size=1, max_size=3)
    )
    return builtin + "".join(draw(BLANK) + argument for argument in arguments)


@st.composite
def line(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["commands", "commands", "commands", "comment", "blank"]))
    if kind == "blank":
        return draw(st.sampled_from(["", "  ", "\t"]))
    comment = "# " + draw(st.text(alphabet="ab $'\"\\`;(", max_size=6))
    if kind == "comment":
        return draw(st.sampled_from(["", " "])) + comment
    commands = draw(st.lists(command(), min_size=1, max_size=3))
    text = draw(st.sampled_from(["", " "])) + commands[0]
    for more in commands[1:]:
        text += draw(st.sampled_from([";", "; ", " ; "])) + more
    ending = draw(st.sampled_from(["", ";", " ", " " + comment, ";" + comment]))
    return text + ending


FILES = st.lists(line(), min_size=1, max_size=5).map("\n".join)


def compare(text: str, environment: dict[str, str]) -> None:
    """Assert our values equal bash's, or that we refused what bash also rejects."""
    names = [*READ, *environment]
    with tempfile.TemporaryDirectory() as workdir:
        bash = bash_source(text, environment, names, Path(workdir))
    try:
        ours = our_values(text, environment, names)
    except ConfigError as error:
        assert any(reason in error.message for reason in DATA_REFUSALS), error
        if "bash stops here" in error.message:
            assert bash.returncode != 0, bash
        return
    assert (bash.returncode, bash.stderr) == (0, ""), (text, bash)
    assert ours == bash.values, text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FILES, ENVIRONMENTS)
def test_generated_files_get_the_values_bash_gives(text: str, environment: dict[str, str]) -> None:
    compare(text, environment)


FRAGMENT = st.sampled_from(
    [" ", " A=", " B+=", "\n", ";", "#", "\\\n", "~", ":", "=", "\t", "\u00e9", "a", "/"] * 3
    + ["${A", "${E:-", "${#E}", "$A", "}", "'", '"', "\\", "$", "{", f"~{ROOT_USER}", "${U:="]
    + ["${A+", "${E#", "$(", "<(", "`", "(", ")"]
)
LOOSE = st.lists(
    st.builds(
        operator.add,
        st.sampled_from(["A=", "B+=", "export A=", "HOME=", "declare B=", "x_1=", ""]),
        st.lists(FRAGMENT, max_size=10).map("".join),
    ),
    min_size=1,
    max_size=4,
).map("\n".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LOOSE, ENVIRONMENTS)
def test_loose_text_is_refused_or_read_as_bash_reads_it(
    text: str, environment: dict[str, str]
) -> None:
    try:
        our_values(text, environment, READ)
    except ConfigError:
        return
    compare(text, environment)
