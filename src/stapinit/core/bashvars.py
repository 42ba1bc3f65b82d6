"""A parser for the bash-syntax configuration files of systemtap-service.

Upstream *sources* these files (``set -a; . FILE``), so admins write shell in
them, often copied from their own shell. We never execute them: we read the
assignment part of the bash language and give each variable exactly the value
bash would give it (checked against bash 5 by
``tests/core/test_bashvars_oracle.py``); anything outside that part is refused
with ``FILE:LINE: why``, so a configuration file can never run code at boot nor
mean something else than it did for upstream.

The accepted language (bash semantics throughout):

* Commands separated by newlines or ``;``; blanks are spaces and tabs; ``#`` at
  the start of a word begins a comment; backslash-newline joins lines (except
  inside single quotes and comments).
* ``NAME=word`` and ``NAME+=word`` (append), several on one line, assigned
  left to right: ``A=1 B=$A`` gives ``B=1``.
* ``export``, ``declare`` and ``typeset`` followed by ``NAME``, ``NAME=word``
  or ``NAME+=word`` arguments (no options). As in bash, every word of the
  command is expanded before any is assigned: ``export A=1 B=$A`` gives ``B``
  the value ``A`` had before the line. A bare ``NAME`` changes no value.
* Words: unquoted characters, ``\\c`` escapes, ``'single quotes'``,
  ``"double quotes"`` (where ``\\`` escapes only ``$ ` " \\`` and newline).
  Assignment values are not split nor globbed, as in bash.
* Expansions: ``$NAME``, ``${NAME}``, ``${#NAME}`` (ASCII values only: bash
  counts characters of the locale), ``${NAME-w}``, ``${NAME:-w}``,
  ``${NAME+w}``, ``${NAME:+w}``, ``${NAME=w}``, ``${NAME:=w}`` (assigns NAME),
  ``${NAME?w}`` and ``${NAME:?w}`` (refused with the message when NAME is unset
  or empty: bash stops reading there). ``w`` is a word as above and is
  expanded only when used. A ``$`` that starts no expansion stays literal.
* Tilde expansion at the start of an assignment value and after each unquoted
  ``:`` in it; likewise in ``${NAME:-w}`` and ``${NAME:+w}`` words outside
  double quotes, and at the start only of ``${NAME:=w}`` words:
  ``~`` is ``$HOME`` (the home directory of the password database when HOME is
  unset), ``~user`` that user's home directory; an unknown user, or a quoted
  character in the prefix, leaves the text as it is.

Refused, each with the reason: commands and keywords, redirections, pipes,
``&``, arrays, ``$(...)``, backquotes, ``$((...))``, ``$[...]``, ``$'...'``,
``$"..."``, ``<(...)`` and ``>(...)`` inside ``${...}`` (bash runs them),
positional and special parameters (``$1``, ``$@``, ``$?``...), other ``${...}``
forms (patterns, substrings, indirection, case changes), ``readonly`` and
``local``, options of ``export``/``declare``, an unquoted ``{`` in an
``export`` argument (bash brace-expands it there) or in a ``${X:-w}`` word
(bash pairs it with a ``}``), quotes inside a double-quoted ``"${X:-w}"`` word
(bash's rules there are unlike either kind of quoting), ``~+``, ``~-`` and
``~N``, the variables bash maintains itself (``$RANDOM``, ``$PWD``, ``$IFS``,
``$BASH_VERSION``... read or assigned), reading ``$PATH``, ``$HOSTNAME``,
``$SHELL`` or ``$TERM`` while unset (bash would invent a value), and a file
containing a NUL byte (bash cannot hold NUL in a value) or ending in an
unescaped backslash (bash keeps or drops it depending on the lines before).
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Mapping
from typing import NamedTuple

from stapinit.core.errors import ConfigFileError

NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
NAME_CHARS = NAME_START | frozenset("0123456789")
_BLANKS = frozenset(" \t")
# Characters that end an unquoted word (bash's metacharacters).
_METACHARS = frozenset(" \t\n;&|<>()")
_DECLARATIONS = frozenset({"export", "declare", "typeset"})
_REFUSED_BUILTINS = {
    "readonly": "readonly is not supported (bash refuses later assignments); use NAME=value",
    "local": "local is only valid inside a function (bash refuses it here)",
}
# Variables bash sets or interprets itself (``env -i bash -c 'compgen -v'`` of
# bash 5, plus those that change how bash reads the rest of the file): their
# value at boot is bash's, not the file's, so neither reading nor assigning
# them is accepted.
_BASH_OWNED = frozenset(
    {
        *("COMP_WORDBREAKS", "DIRSTACK", "EPOCHREALTIME", "EPOCHSECONDS", "EUID", "FUNCNAME"),
        *("GROUPS", "HISTCMD", "HOSTTYPE", "IFS", "LINENO", "MACHTYPE", "OLDPWD", "OPTARG"),
        *("OPTERR", "OPTIND", "OSTYPE", "PIPESTATUS", "POSIXLY_CORRECT", "PPID", "PS4", "PWD"),
        *("RANDOM", "SECONDS", "SHELLOPTS", "SHLVL", "SRANDOM", "UID", "_"),
    }
)
# Variables bash gives a value of its own only when the environment has none.
_BASH_DEFAULTED = frozenset({"PATH", "HOSTNAME", "SHELL", "TERM"})
_UNQUOTED_BRACE = {
    False: "unquoted '{' in an export/declare argument (bash brace-expands it); quote it",
    True: "unquoted '{' inside ${...} (bash pairs it with a '}'); quote it",
}
# bash parses ``<(`` and ``>(`` inside ``${...}`` as commands (and runs them outside quotes).
_PROCESS_SUBSTITUTION = "process substitution <(...) or >(...) is not allowed"
_DIRECTORY_STACK_TILDE = re.compile(r"[+-]?[0-9]*")


class ConfigError(ConfigFileError):
    """A configuration file is not something we accept; str() is ``FILE:LINE: why`` (exit 6)."""


class Assignment(NamedTuple):
    """One assignment found in a file, with the variable's resulting value.

    ``line`` is where the assignment starts (for ``${NAME:=w}``, where that
    expansion starts); for ``NAME+=w`` ``value`` is the whole new value.
    """

    name: str
    value: str
    filename: str
    line: int


def _is_bash_owned(name: str) -> bool:
    return name in _BASH_OWNED or name in ("BASH", "BASHOPTS", "BASHPID") or name[:5] == "BASH_"


class _Parser:
    """Reads one file: a cursor over its text plus the variables seen so far.

    ``peek``/``take`` skip backslash-newline pairs, as bash's reader does
    everywhere but inside single quotes and comments (read with ``take_raw``).
    ``active`` is false while reading a ``${X:-w}`` word that bash will not
    expand: it is checked for syntax but assigns nothing and fails nothing.
    """

    def __init__(self, text: str, filename: str, environment: Mapping[str, str]) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.filename = filename
        self.variables = dict(environment)
        self.result: list[Assignment] = []
        self.active = True

    # -- cursor ---------------------------------------------------------------

    def error(self, message: str, line: int | None = None) -> ConfigError:
        """The error for ``message`` (control characters from the file escaped: one line)."""
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        return ConfigError(self.filename, self.line if line is None else line, shown)

    def _skip_continuations(self) -> None:
        while self.text.startswith("\\\n", self.pos):
            self.pos += 2
            self.line += 1

    def peek(self) -> str:
        self._skip_continuations()
        return self.text[self.pos : self.pos + 1]

    def peek_second(self) -> str:
        """The character after the current one, skipping line continuations."""
        self._skip_continuations()
        index = self.pos + 1
        while self.text.startswith("\\\n", index):
            index += 2
        return self.text[index : index + 1]

    def take(self) -> str:
        self._skip_continuations()
        return self.take_raw()

    def take_raw(self) -> str:
        char = self.text[self.pos : self.pos + 1]
        self.pos += len(char)
        if char == "\n":
            self.line += 1
        return char

    def read_name(self) -> str:
        chars: list[str] = []
        while (char := self.peek()) and char in NAME_CHARS and (chars or char in NAME_START):
            chars.append(self.take())
        return "".join(chars)

    def raw_word_at(self, start: int) -> str:
        """The text of the word starting at ``start``, for error messages."""
        end = start
        while end < len(self.text) and self.text[end] not in _METACHARS:
            end += 1
        return self.text[start:end] or self.text[start : start + 1]

    def skip_blanks_and_comment(self) -> None:
        while self.peek() in _BLANKS and self.peek():
            self.take()
        if self.peek() == "#":
            while self.text[self.pos : self.pos + 1] not in ("", "\n"):
                self.take_raw()

    def at_word_end(self) -> bool:
        char = self.peek()
        return not char or char in _METACHARS

    # -- variables ------------------------------------------------------------

    def lookup(self, name: str) -> str:
        if _is_bash_owned(name):
            raise self.error(f"${name} is bash's own variable; its value is not known here")
        if name in self.variables:
            return self.variables[name]
        if name in _BASH_DEFAULTED and self.active:
            raise self.error(f"${name} is not set (bash would supply a value of its own)")
        return ""

    def check_assignable(self, name: str, line: int) -> None:
        if _is_bash_owned(name):
            raise self.error(f"{name} is a variable bash maintains itself; it cannot be set", line)

    def assign(self, name: str, value: str, line: int, append: bool = False) -> None:
        if append:
            value = self.variables.get(name, "") + value
        self.variables[name] = value
        self.result.append(Assignment(name, value, self.filename, line))

    # -- commands -------------------------------------------------------------

    def parse(self) -> list[Assignment]:
        while True:
            self.skip_blanks_and_comment()
            char = self.peek()
            if not char:
                return self.result
            if char == "\n":
                self.take()
                continue
            self.command()
            self.skip_blanks_and_comment()
            char = self.peek()
            if char == ";":
                self.take()
            elif char and char != "\n":
                raise self.unexpected(char)

    def unexpected(self, char: str) -> ConfigError:
        if char in "()":
            return self.error(f"unexpected '{char}' (arrays and subshells are not allowed)")
        if char == ";":
            return self.error("unexpected ';' (no command before it)")
        return self.error(f"unexpected '{char}' (only assignments are allowed)")

    def command(self) -> None:
        """One simple command: assignments, or a declaration builtin."""
        char = self.peek()
        if char in _METACHARS:
            raise self.unexpected(char)
        start, line = self.pos, self.line
        name = self.read_name()
        if name and self.at_assignment_operator():
            self.assignment(name, line)
            while True:
                self.skip_blanks_and_comment()
                if self.at_word_end():
                    return
                start, line = self.pos, self.line
                name = self.read_name()
                if not (name and self.at_assignment_operator()):
                    word = self.raw_word_at(start)
                    raise self.error(
                        f"not an assignment: {word!r} (bash would run it as a command)", line
                    )
                self.assignment(name, line)
        if name in _DECLARATIONS and self.at_word_end():
            self.declaration(name, line)
        elif name in _REFUSED_BUILTINS and self.at_word_end():
            raise self.error(_REFUSED_BUILTINS[name], line)
        else:
            word = self.raw_word_at(start)
            raise self.error(
                f"not an assignment: {word!r} (only NAME=value lines are allowed)", line
            )

    def at_assignment_operator(self) -> bool:
        return self.peek() == "=" or (self.peek() == "+" and self.peek_second() == "=")

    def take_assignment_operator(self) -> bool:
        """Consume ``=`` or ``+=``; true for ``+=``."""
        append = self.take() == "+"
        if append:
            self.take()
        return append

    def assignment(self, name: str, line: int) -> None:
        self.check_assignable(name, line)
        append = self.take_assignment_operator()
        self.assign(name, self.word(declaration=False), line, append)

    def declaration(self, builtin: str, line: int) -> None:
        """``export A=1 B=$A``: expand every word, then assign in order (as bash)."""
        pending: list[tuple[str, str, int, bool]] = []
        arguments = 0
        while True:
            self.skip_blanks_and_comment()
            if self.at_word_end():
                break
            arguments += 1
            start, arg_line = self.pos, self.line
            if self.peek() == "-":
                raise self.error(f"options of {builtin} are not supported")
            name = self.read_name()
            if name and self.at_assignment_operator():
                self.check_assignable(name, arg_line)
                append = self.take_assignment_operator()
                pending.append((name, self.word(declaration=True), arg_line, append))
            elif not (name and self.at_word_end()):
                word = self.raw_word_at(start)
                raise self.error(f"{builtin}: not a variable name: {word!r}", arg_line)
        if not arguments:
            raise self.error(f"{builtin} without names lists variables; nothing to set", line)
        for name, value, arg_line, append in pending:
            self.assign(name, value, arg_line, append)

    # -- words ----------------------------------------------------------------

    def word(self, declaration: bool, brace_line: int = 0, colon_tilde: bool = True) -> str:
        """An unquoted word: an assignment value, or a ``${X:-w}`` word outside quotes.

        Ends before a metacharacter, or for a ``${`` opened on ``brace_line``
        before the closing ``}``. A tilde prefix is expanded at the start, and
        after each unquoted ``:`` when ``colon_tilde`` (bash: not in the word
        of ``${X=w}``).
        """
        in_braces = brace_line > 0
        chars: list[str] = []
        tilde_here = True
        while True:
            char = self.peek()
            if in_braces:
                if not char:
                    raise self.error("unterminated ${", brace_line)
                if char == "}":
                    return "".join(chars)
            elif not char or char in _METACHARS:
                if char and char not in " \t\n;":
                    raise self.unexpected(char)
                return "".join(chars)
            if tilde_here and char == "~":
                chars.append(self.tilde(in_braces))
            elif char == "'":
                chars.append(self.single_quoted())
            elif char == '"':
                chars.append(self.double_quoted())
            elif char == "\\":
                self.take()
                escaped = self.take_raw()
                if not escaped:
                    # bash keeps or drops it depending on how the line was read
                    raise self.error("backslash at the end of the file")
                chars.append(escaped)
            elif char == "$":
                chars.append(self.dollar(quoted=False, declaration=declaration))
            elif char == "`":
                raise self.error("command substitution `...` is not allowed")
            elif in_braces and char in "<>" and self.peek_second() == "(":
                raise self.error(_PROCESS_SUBSTITUTION)
            elif char == "{" and (declaration or in_braces):
                raise self.error(_UNQUOTED_BRACE[in_braces])
            else:
                chars.append(self.take())
            tilde_here = colon_tilde and char == ":"

    def tilde(self, in_braces: bool) -> str:
        """Expand ``~`` or ``~user`` at the cursor; literal ``~`` when bash leaves it."""
        line = self.line
        start = (self.pos, self.line)
        self.take()
        user: list[str] = []
        # The prefix runs to '/' or ':'; metacharacters are plain text inside ${...}.
        while (char := self.peek()) and char not in "/:":
            if char == "}" if in_braces else char in _METACHARS:
                break
            if char in "'\"\\":
                self.pos, self.line = start
                self.take()
                return "~"
            user.append(self.take())
        name = "".join(user)
        if name and _DIRECTORY_STACK_TILDE.fullmatch(name):
            raise self.error(f"~{name} depends on the directory stack; not supported", line)
        if not name:
            home = self.variables.get("HOME")
            if home is not None:
                return home
            try:
                return pwd.getpwuid(os.getuid()).pw_dir
            except KeyError:
                raise self.error("~ with HOME unset and no password entry", line) from None
        try:
            return pwd.getpwnam(name).pw_dir
        except (KeyError, ValueError, UnicodeError):
            # bash leaves an unknown ~user as it is and reads on from there.
            self.pos, self.line = start
            self.take()
            return "~"

    def single_quoted(self) -> str:
        line = self.line
        self.take()
        chars: list[str] = []
        while (char := self.take_raw()) != "'":
            if not char:
                raise self.error("unterminated single quote", line)
            chars.append(char)
        return "".join(chars)

    def double_quoted(self) -> str:
        line = self.line
        self.take()
        chars: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise self.error("unterminated double quote", line)
            if char == '"':
                self.take()
                return "".join(chars)
            chars.append(self.quoted_character(closing='"'))

    def quoted_character(self, closing: str) -> str:
        """One unit inside double quotes (``closing`` ends the caller's loop)."""
        char = self.peek()
        if char == "\\":
            self.take()
            escaped = self.take_raw()
            if not escaped:
                return ""  # end of text: the caller reports the open quote
            return escaped if escaped in '$`"\\' + closing else "\\" + escaped
        if char == "$":
            return self.dollar(quoted=True, declaration=False)
        if char == "`":
            raise self.error("command substitution `...` is not allowed")
        return self.take()

    def dollar(self, quoted: bool, declaration: bool) -> str:
        """Expand what starts at the ``$`` under the cursor."""
        self.take()
        char = self.peek()
        if char == "{":
            return self.braced(quoted, declaration)
        if char == "(":
            raise self.error("command substitution $(...) and arithmetic $((...)) are not allowed")
        if char == "[":
            raise self.error("arithmetic $[...] is not allowed")
        if char and char in NAME_START:
            return self.lookup(self.read_name())
        if char and char in "0123456789@*#?-$!":
            raise self.error(f"special parameter ${char} is not allowed")
        if char in ("'", '"') and char and not quoted:
            raise self.error(f"unsupported quoting ${char}...{char}")
        return "$"

    def braced(self, quoted: bool, declaration: bool) -> str:
        """``${...}``: the cursor is on the ``{``."""
        line = self.line
        self.take()
        length = self.peek() == "#" and self.peek_second() in NAME_START
        if length:
            self.take()
        name = self.read_name()
        if not name:
            raise self.error(f"unsupported parameter expansion ${{{self.peek()}...}}")
        char = self.take()
        if not char:
            raise self.error("unterminated ${", line)
        if length or char == "}":
            if char != "}":
                raise self.error(f"unsupported parameter expansion ${{#{name}{char}...}}")
            value = self.lookup(name)
            if not length:
                return value
            if not value.isascii():
                raise self.error(f"${{#{name}}} of a non-ASCII value depends on the locale")
            return str(len(value))
        colon = char == ":"
        if colon:
            char = self.take()
        if not char or char not in "-=?+":
            shown = f"{name}{':' if colon else ''}{char}"
            raise self.error(f"unsupported parameter expansion ${{{shown}...}}", line)
        if char == "=":
            self.check_assignable(name, line)
        value = self.lookup(name)
        is_set = name in self.variables and (bool(value) or not colon)
        use_word = is_set if char == "+" else not is_set
        outer_active = self.active
        self.active = outer_active and use_word
        if quoted:
            word = self.quoted_brace_word(line)
        else:
            word = self.word(declaration, line, colon_tilde=char != "=")
        self.active = outer_active
        self.take()
        if not (outer_active and use_word):
            return "" if char == "+" else value
        if char == "=":
            self.assign(name, word, line)
        elif char == "?":
            why = word or "parameter null or not set"
            raise self.error(f"{name}: {why} (${{{name}{':' if colon else ''}?}}: bash stops here)")
        return word

    def quoted_brace_word(self, brace_line: int) -> str:
        """The ``w`` of ``"${X:-w}"``: double-quote rules, ``\\}`` escapes ``}``."""
        chars: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise self.error("unterminated ${", brace_line)
            if char == "}":
                return "".join(chars)
            if char == "{":
                raise self.error(_UNQUOTED_BRACE[True])
            if char in "<>" and self.peek_second() == "(":
                raise self.error(_PROCESS_SUBSTITUTION)
            if char in ("'", '"'):
                raise self.error(
                    f"quote {char} inside a double-quoted ${{...}} word is ambiguous; "
                    "drop the outer double quotes"
                )
            chars.append(self.quoted_character(closing="}"))


def parse_assignments(text: str, filename: str, environment: Mapping[str, str]) -> list[Assignment]:
    """Parse one configuration file into its assignments, in order.

    Values are bash's for ``set -a; source FILE`` in a shell whose variables
    are ``environment`` (pass the process environment and the values of
    earlier files). ``~`` uses ``environment``'s ``HOME``, else the password
    database, as bash does. Anything outside the accepted language (module
    docstring) raises :class:`ConfigError` naming the line.
    """
    nul = text.find("\0")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise ConfigError(filename, line, "NUL byte (bash cannot hold it in a variable)")
    return _Parser(text, filename, environment).parse()
