"""Reading one section of the INI-style files of ``stap-client`` and ``stap-loader``."""

from __future__ import annotations

import configparser
from collections.abc import Mapping, Set


class IniError(Exception):
    """The file is not usable; ``str()`` is one line naming it."""


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
