"""Splitting and filtering of per-script stap options (``NAME_OPT``, spec §4.2.1).

Pure functions: the same option string always gives the same lists.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import NamedTuple

from stapinit.core.runtime import LoadOptions, RuntimeKind

# stap's short options that take an argument (from `stap --help`, 4.8), so that
# filtering drops an option together with its argument.
_TAKES_ARGUMENT = frozenset("psIDBGRramoEcxSdTeLl")
# Long options that take an argument, which may come as the next word.
_LONG_TAKES_ARGUMENT = frozenset(
    {
        "--vp",
        "--modinfo",
        "--compatible",
        "--tmpdir",
        "--sysroot",
        "--sysenv",
        "--remote",
        "--target-namespace",
        "--runtime",
        "--privilege",
    }
)
# Dropped when compiling: the service decides these itself (spec §4.2.1).
_DROP_WHEN_COMPILING = frozenset("pmrcxesohVk")


class OptionError(ValueError):
    """An option string that cannot be split or used."""


class Option(NamedTuple):
    """One option as stap's getopt sees it: ``-o FILE`` is flag ``o``, value ``FILE``."""

    flag: str  # one letter for short options, "--name" for long ones
    value: str | None
    words: tuple[str, ...]  # the words it occupied, to pass it on unchanged


def split_options(text: str) -> list[str]:
    """Split ``text`` into words as the shell would (quotes keep words together)."""
    try:
        return shlex.split(text, comments=False, posix=True)
    except ValueError as error:
        raise OptionError(str(error).lower()) from None


def parse_options(words: Sequence[str]) -> list[Option]:
    """Group words into options, following stap's getopt conventions."""
    options: list[Option] = []
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word.startswith("--") and len(word) > 2:
            name, equals, value = word.partition("=")
            if equals:
                options.append(Option(name, value, (word,)))
            elif name in _LONG_TAKES_ARGUMENT:
                if index >= len(words):
                    raise OptionError(f"option {name} needs an argument")
                options.append(Option(name, words[index], (word, words[index])))
                index += 1
            else:
                options.append(Option(name, None, (word,)))
            continue
        if not word.startswith("-") or word == "-":
            raise OptionError(f"unexpected argument {word!r} (only options are allowed)")
        # A cluster such as `-vk` or `-p4` or `-o FILE`.
        position = 1
        while position < len(word):
            letter = word[position]
            position += 1
            if letter not in _TAKES_ARGUMENT:
                options.append(Option(letter, None, (f"-{letter}",)))
                continue
            if position < len(word):
                value = word[position:]
                options.append(Option(letter, value, (f"-{letter}", value)))
            elif index < len(words):
                value = words[index]
                index += 1
                options.append(Option(letter, value, (f"-{letter}", value)))
            else:
                raise OptionError(f"option -{letter} needs an argument")
            break
    return options


def _flatten(options: Sequence[Option]) -> list[str]:
    return [word for option in options for word in option.words]


def runtime_of(options: Sequence[Option]) -> RuntimeKind:
    """``"bpf"`` when the options select the BPF runtime, else ``"kmod"``."""
    runtime: RuntimeKind = "kmod"
    for option in options:
        if option.flag == "--runtime":
            runtime = "bpf" if option.value == "bpf" else "kmod"
        elif option.flag == "--bpf":
            runtime = "bpf"
    return runtime


def compile_options(options: Sequence[Option]) -> list[str]:
    """The options passed to ``stap -p4`` (spec §4.2.1's compile-time filter).

    The runtime selection is dropped too: the caller adds ``--runtime=bpf``
    itself, once, so that it is recorded the same way in the cache.
    """
    kept = [
        option
        for option in options
        if option.flag not in _DROP_WHEN_COMPILING and option.flag not in ("--runtime", "--bpf")
    ]
    return _flatten(kept)


def start_options(options: Sequence[Option]) -> LoadOptions:
    """Keep what staprun/stapbpf take at start: -o, -S, -s, -c, -x (last one wins)."""
    found: dict[str, str] = {}
    for option in options:
        if option.flag in ("o", "S", "s", "c", "x") and option.value is not None:
            found[option.flag] = option.value
    if "s" in found and not _is_buffer_size(found["s"]):
        raise OptionError(f"-s {found['s']}: buffer size must be a number of MB from 1 to 4095")
    return LoadOptions(
        output_file=found.get("o"),
        file_switch=found.get("S"),
        buffer_mb=found.get("s"),
        command=found.get("c"),
        target_pid=found.get("x"),
    )


def _is_buffer_size(value: str) -> bool:
    return value.isdigit() and 1 <= int(value) <= 4095
