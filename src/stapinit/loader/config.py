"""``stap-loader``'s settings: an optional INI file, then command-line overrides.

The file is ``/etc/systemtap/stap-loader.conf`` (see ``data/loader``), section
``[loader]``::

    socket = /run/stap-loader.sock
    stapbpf = stapbpf
    staprun = staprun
    signer_store = /etc/systemtap/staprun
    stop_timeout = 5
    max_sessions = 16
    max_sessions_per_user = 4
    io_timeout = 30
    spool_limit = 512M

Tool names without a slash are looked up in a fixed system ``PATH``, never the
caller's. The loader runs as root, so the file must be root's alone
(:func:`stapinit.core.tools.root_only_problem`): whoever could edit it would
choose what root runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from stapinit.core import values
from stapinit.core.errors import ConfigFileError
from stapinit.core.inifile import IniError, read_ini_file, read_section, setting_line
from stapinit.core.tools import root_only_problem
from stapinit.loader_wire import DEFAULT_SOCKET
from stapinit.trust.stores import StorePaths

CONFIG_NAME: Final = "stap-loader.conf"
SECTION: Final = "loader"
_KEYS: Final = frozenset(
    {
        "socket",
        "stapbpf",
        "staprun",
        "signer_store",
        "stop_timeout",
        "max_sessions",
        "max_sessions_per_user",
        "io_timeout",
        "spool_limit",
    }
)

_T = TypeVar("_T")


@dataclass(frozen=True)
class LoaderConfig:
    """Everything ``stap-loader`` needs to know."""

    socket_path: Path
    stapbpf: str
    staprun: str
    signer_store: Path
    #: Seconds between SIGTERM and SIGKILL when a module is stopped.
    stop_timeout: float = 5.0
    max_sessions: int = 16
    #: So that one user cannot take every session from the others.
    max_sessions_per_user: int = 4
    #: How long a client may take to send its whole request, or to take a piece of output.
    io_timeout: float = 30.0
    #: Bytes of module data held (received or running) across all sessions at once.
    spool_limit: int = 512 << 20


def default_config_file(paths: StorePaths) -> Path:
    """The standard location of the loader's configuration file."""
    return paths.sysconf / CONFIG_NAME


def parse_config(text: str, origin: str, paths: StorePaths) -> LoaderConfig:
    """Build a configuration from the text of a config file (pure).

    Raises :class:`ConfigFileError` naming ``origin`` and the line at fault.
    """
    try:
        section = read_section(text, origin, SECTION, _KEYS)
    except IniError as exc:
        raise ConfigFileError(origin, 0, str(exc).removeprefix(f"{origin}: ")) from None

    def get(key: str, convert: Callable[[str], _T], default: str) -> _T:
        try:
            return convert(section.get(key, default))
        except ValueError as exc:
            line = setting_line(text, SECTION, key)
            raise ConfigFileError(origin, line, f"{key}: {exc}") from None

    def sessions(text: str) -> int:
        return values.count(text, 1, 4096)

    def tool(text: str) -> str:
        return values.tool(text.strip())

    return LoaderConfig(
        socket_path=Path(get("socket", values.absolute_path, str(DEFAULT_SOCKET))),
        stapbpf=get("stapbpf", tool, "stapbpf"),
        staprun=get("staprun", tool, "staprun"),
        signer_store=Path(get("signer_store", values.absolute_path, str(paths.signers))),
        stop_timeout=get("stop_timeout", values.seconds, "5"),
        max_sessions=get("max_sessions", sessions, "16"),
        max_sessions_per_user=get("max_sessions_per_user", sessions, "4"),
        io_timeout=get("io_timeout", values.seconds, "30"),
        spool_limit=get("spool_limit", values.size, "512M"),
    )


def read_config(path: Path | None, paths: StorePaths) -> LoaderConfig:
    """Read ``path`` (or the default file if it exists; else use defaults).

    The file must be root's alone (it says what root runs); raises
    :class:`ConfigFileError` otherwise, or when it cannot be read or parsed.
    """
    explicit = path is not None
    file = path if path is not None else default_config_file(paths)
    if os.path.lexists(file):
        reason = root_only_problem(file)
        if reason:
            raise ConfigFileError(str(file), 0, f"not used, since others could change it: {reason}")
    try:
        text = read_ini_file(file)
    except IniError as exc:
        raise ConfigFileError(str(file), 0, str(exc).removeprefix(f"{file}: ")) from None
    if text is None:
        if explicit:
            raise ConfigFileError(str(file), 0, "no such configuration file")
        text = ""
    return parse_config(text, str(file), paths)
