"""A parser for the bash-syntax configuration files of systemtap-service.

Upstream sources these files with bash, so people write shell in them. We read
the part of the shell language that a configuration file needs -- assignments
with quoting, escapes and ``$NAME`` expansion -- and reject everything that
would run a command, so a config file can never execute code at boot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from stapinit.core.errors import ConfigFileError

NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
NAME_CHARS = NAME_START | frozenset("0123456789")
# Characters that end an unquoted word or start shell syntax we do not accept.
_METACHARS = frozenset(" \t\n;&|<>()")
_EXPORT_WORDS = frozenset({"export", "readonly", "declare", "typeset", "local"})


class ConfigError(ConfigFileError):
    """A configuration file is not something we accept; str() is ``FILE:LINE: why``."""


class Assignment(NamedTuple):
    """One ``NAME=value`` found in a file, with the value already expanded."""

    name: str
    value: str
    filename: str
    line: int


def is_name(text: str) -> bool:
    """True when ``text`` is a valid shell variable name."""
    return bool(text) and text[0] in NAME_START and all(c in NAME_CHARS for c in text)


class _Reader:
    """Walks the text of one file, expanding words against known variables."""

    def __init__(self, text: str, filename: str, variables: Mapping[str, str]) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.filename = filename
        self.variables = variables

    def error(self, message: str, line: int | None = None) -> ConfigError:
        return ConfigError(self.filename, self.line if line is None else line, message)

    def peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def advance(self) -> str:
        char = self.text[self.pos]
        self.pos += 1
        if char == "\n":
            self.line += 1
        return char

    def skip_blanks(self) -> None:
        """Skip spaces, tabs, line continuations and a trailing comment."""
        while True:
            char = self.peek()
            if char in (" ", "\t"):
                self.advance()
            elif char == "\\" and self.peek(1) == "\n":
                self.advance()
                self.advance()
            elif char == "#":
                while self.peek() not in ("", "\n"):
                    self.advance()
            else:
                return

    def at_separator(self) -> bool:
        return self.peek() in ("", "\n", ";")

    def read_raw_word(self) -> str:
        """The unexpanded characters of the next word, for error messages."""
        start = self.pos
        while self.peek() and self.peek() not in _METACHARS:
            self.pos += 1
        return self.text[start : self.pos] or self.peek()

    def expand_dollar(self) -> str:
        """Expand ``$NAME`` or ``${NAME}``; the ``$`` is the current character."""
        self.advance()
        char = self.peek()
        if char == "{":
            self.advance()
            start = self.pos
            while self.peek() and self.peek() != "}":
                if self.peek() == "\n":
                    break
                self.pos += 1
            name = self.text[start : self.pos]
            if self.peek() != "}":
                raise self.error("unterminated ${")
            self.advance()
            if not is_name(name):
                raise self.error(f"unsupported parameter expansion ${{{name}}}")
            return self.variables.get(name, "")
        if char == "(":
            raise self.error("command substitution $(...) is not allowed")
        if char in NAME_START:
            start = self.pos
            while self.peek() in NAME_CHARS and self.peek():
                self.pos += 1
            return self.variables.get(self.text[start : self.pos], "")
        if char in ("'", '"'):
            raise self.error(f"unsupported quoting ${char}...{char}")
        if char and char not in _METACHARS:
            raise self.error(f"unsupported expansion ${char}")
        return "$"

    def read_single_quoted(self) -> str:
        start_line = self.line
        self.advance()
        chars: list[str] = []
        while True:
            if not self.peek():
                raise self.error("unterminated single quote", start_line)
            char = self.advance()
            if char == "'":
                return "".join(chars)
            chars.append(char)

    def read_double_quoted(self) -> str:
        start_line = self.line
        self.advance()
        chars: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise self.error("unterminated double quote", start_line)
            if char == '"':
                self.advance()
                return "".join(chars)
            if char == "`":
                raise self.error("command substitution `...` is not allowed")
            if char == "$":
                chars.append(self.expand_dollar())
            elif char == "\\":
                self.advance()
                following = self.peek()
                if following == "\n":
                    self.advance()
                elif following in ('"', "\\", "$", "`"):
                    chars.append(self.advance())
                else:
                    chars.append("\\")
            else:
                chars.append(self.advance())

    def read_value(self) -> str:
        """Read and expand one word (the right-hand side of an assignment)."""
        chars: list[str] = []
        while True:
            char = self.peek()
            if not char or char in _METACHARS:
                if char in ("(", ")"):
                    raise self.error(f"unexpected '{char}' (arrays and subshells are not allowed)")
                if char in ("&", "|", "<", ">"):
                    raise self.error(f"unexpected '{char}' (only assignments are allowed)")
                return "".join(chars)
            if char == "'":
                chars.append(self.read_single_quoted())
            elif char == '"':
                chars.append(self.read_double_quoted())
            elif char == "`":
                raise self.error("command substitution `...` is not allowed")
            elif char == "$":
                chars.append(self.expand_dollar())
            elif char == "\\":
                self.advance()
                if self.peek() == "\n":
                    self.advance()
                elif self.peek():
                    chars.append(self.advance())
            else:
                chars.append(self.advance())

    def read_name(self) -> str:
        start = self.pos
        while self.peek() and self.peek() in NAME_CHARS:
            self.pos += 1
        return self.text[start : self.pos]


def parse_assignments(text: str, filename: str, environment: Mapping[str, str]) -> list[Assignment]:
    """Parse one configuration file into its assignments, in order.

    ``$NAME`` expands to a value assigned earlier in this file, else to
    ``environment`` (pass the values of earlier files and the process
    environment there), else to the empty string, as in bash. Anything that
    is not an assignment raises :class:`ConfigError` naming the line.
    """
    variables = dict(environment)
    reader = _Reader(text, filename, variables)
    result: list[Assignment] = []
    while True:
        reader.skip_blanks()
        char = reader.peek()
        if not char:
            return result
        if char in ("\n", ";"):
            reader.advance()
            continue
        if char in "&|<>()":
            raise reader.error(f"unexpected '{char}' (only assignments are allowed)")
        line = reader.line
        start = reader.pos
        name = reader.read_name()
        if name in _EXPORT_WORDS and reader.peek() in (" ", "\t"):
            # `export A=1 B` : the assignments after it count; bare names are no-ops.
            _read_export_arguments(reader, result, variables)
            continue
        if not name or reader.peek() != "=":
            reader.pos = start
            word = reader.read_raw_word()
            raise reader.error(f"not an assignment: {word!r} (only NAME=value lines are allowed)")
        reader.advance()
        value = reader.read_value()
        variables[name] = value
        # `A=1 B=2` is two assignments; `A=1 cmd` would run a command, and the
        # next pass rejects `cmd` as not an assignment.
        result.append(Assignment(name, value, filename, line))


def _read_export_arguments(
    reader: _Reader, result: list[Assignment], variables: dict[str, str]
) -> None:
    while True:
        reader.skip_blanks()
        if reader.at_separator():
            return
        line = reader.line
        start = reader.pos
        name = reader.read_name()
        if name and reader.peek() == "=":
            reader.advance()
            value = reader.read_value()
            variables[name] = value
            result.append(Assignment(name, value, reader.filename, line))
        elif name and (reader.at_separator() or reader.peek() in (" ", "\t")):
            continue
        else:
            reader.pos = start
            raise reader.error(f"not a variable name: {reader.read_raw_word()!r}")
