"""Converters for the values that configuration files and command lines carry.

One rule per kind of value, shared by every program. Each takes the text as
written and returns the value or raises :class:`ValueError` with a short reason;
the caller adds ``FILE:LINE`` or the option's name.
"""

from __future__ import annotations

import math
import posixpath
import re

_TRUE = frozenset({"y", "yes", "true", "on", "1"})
_FALSE = frozenset({"n", "no", "false", "off", "0"})

# A kernel release as `uname -r` prints it and as it names /lib/modules/REL:
# it becomes a directory name, so no '/', and never '.' or '..'.
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}")

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def seconds(text: str) -> float:
    """A positive, finite number of seconds (``10``, ``0.5``, ``1e3``).

    ``inf``, ``nan``, zero and negative numbers raise :class:`ValueError`: a
    wait that never ends (or never starts) is never what a setting means.
    """
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a positive, finite number of seconds")
    return value


def count(text: str, minimum: int = 1, maximum: int = 1 << 20) -> int:
    """A whole number from ``minimum`` to ``maximum`` (decimal digits only)."""
    stripped = text.strip()
    if not stripped.isdigit() or len(stripped) > 12:
        raise ValueError(f"{text!r} is not a whole number")
    value = int(stripped)
    if not minimum <= value <= maximum:
        raise ValueError(f"{text!r} is not from {minimum} to {maximum}")
    return value


def size(text: str) -> int:
    """A size in bytes: digits with an optional ``k``, ``M`` or ``G`` (powers of 1024)."""
    stripped = text.strip()
    unit = stripped[-1:].lower() if stripped[-1:].isalpha() else ""
    digits = stripped[: len(stripped) - len(unit)]
    if unit not in _SIZE_UNITS or not digits.isdigit() or len(digits) > 15:
        raise ValueError(f"{text!r} is not a size (digits, optionally followed by k, M or G)")
    return int(digits) * _SIZE_UNITS[unit]


def boolean(text: str) -> bool:
    """``yes``/``no`` and their usual spellings (``y``, ``1``, ``true``, ``on``; any case)."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use yes or no)")


def release(text: str) -> str:
    """A kernel release name, safe as a directory name under ``/lib/modules`` or a cache."""
    if _RELEASE.fullmatch(text) is None or ".." in text:
        raise ValueError(f"{text!r} is not a kernel release")
    return text


def is_release(text: str) -> bool:
    """True when :func:`release` accepts ``text``."""
    try:
        release(text)
    except ValueError:
        return False
    return True


def tool(text: str) -> str:
    """A program to run: an absolute path, or a bare name looked up on ``PATH``.

    Relative paths with a ``/`` would depend on the working directory, and a
    NUL byte cannot be passed to ``exec``.
    """
    if not text or "\0" in text or "\n" in text:
        raise ValueError(f"{text!r} is not a program name")
    if "/" in text and not text.startswith("/"):
        raise ValueError(f"{text!r} is neither an absolute path nor a bare program name")
    return text


def absolute_path(text: str) -> str:
    """An absolute path without NUL bytes, normalised (``//x/../y`` → ``/y``)."""
    if not text.startswith("/") or "\0" in text:
        raise ValueError(f"{text!r} is not an absolute path")
    return posixpath.normpath(text)
