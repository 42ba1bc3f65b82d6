"""Reading one section of the INI-style files of ``stap-client`` and ``stap-loader``."""

from __future__ import annotations

import configparser
from collections.abc import Mapping, Set
from pathlib import Path
from typing import Final

from stapinit.core.safeio import read_regular

#: Largest configuration file read; anything bigger is not a configuration file.
MAX_INI_BYTES: Final = 1 << 20


class IniError(Exception):
    """The file is not usable; ``str()`` is one line naming it."""


def read_ini_file(path: Path) -> str | None:
    """The text of configuration file ``path``; ``None`` if it does not exist.

    Read with :func:`stapinit.core.safeio.read_regular` (no final symlink, no
    blocking on a FIFO, a regular file of at most :data:`MAX_INI_BYTES`) and
    decoded as UTF-8; anything else raises :class:`IniError` naming the file.
    """
    try:
        data = read_regular(path, MAX_INI_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IniError(f"{path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise IniError(f"{path}: not UTF-8 text") from None


def read_section(text: str, origin: str, section: str, keys: Set[str]) -> Mapping[str, str]:
    """The settings of ``[section]`` in ``text`` (empty if absent).

    Pure. A syntax error or a setting not in ``keys`` raises :class:`IniError`.
    """
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",))
    try:
        parser.read_string(text, source=origin)
    except configparser.Error as exc:
        raise IniError(f"{origin}: {' '.join(str(exc).split())}") from None
    values: Mapping[str, str] = parser[section] if parser.has_section(section) else {}
    unknown = set(values) - set(keys)
    if unknown:
        raise IniError(f"{origin}: unknown setting(s) {', '.join(sorted(unknown))}")
    return dict(values)


def setting_line(text: str, section: str, key: str) -> int:
    """The line number (from 1) where ``key`` is set in ``[section]`` of ``text``; 0 if unseen.

    For ``FILE:LINE`` in messages about a value :func:`read_section` returned
    (which refuses a key set twice in one section).
    """
    found, current = 0, ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped[1:-1].strip()
        elif current == section and not line[:1].isspace():
            name = stripped.partition("=")[0].partition(":")[0].strip().lower()
            if name == key:
                found = number
    return found
