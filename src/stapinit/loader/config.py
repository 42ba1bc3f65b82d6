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

Tool names without a slash are looked up in a fixed system ``PATH``, never the
caller's.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from stapinit.core.inifile import IniError, read_section
from stapinit.core.system import SYSTEM_PATH
from stapinit.trust.stores import StorePaths

DEFAULT_SOCKET: Final = Path("/run/stap-loader.sock")
CONFIG_NAME: Final = "stap-loader.conf"
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
    }
)


class ConfigError(Exception):
    """The configuration is unusable; ``str()`` is one line."""


@dataclass(frozen=True)
class LoaderConfig:
    """Everything ``stap-loader`` needs to know."""

    socket_path: Path
    stapbpf: str
    staprun: str
    signer_store: Path
    stop_timeout: float = 5.0
    max_sessions: int = 16
    #: So that one user cannot take every session from the others.
    max_sessions_per_user: int = 4
    #: How long a client may take to send its whole request, or to take a piece of output.
    io_timeout: float = 30.0


def default_config_file(paths: StorePaths) -> Path:
    """The standard location of the loader's configuration file."""
    return paths.sysconf / CONFIG_NAME


def parse_config(text: str, origin: str, paths: StorePaths) -> LoaderConfig:
    """Build a configuration from the text of a config file (pure)."""
    try:
        section = read_section(text, origin, "loader", _KEYS)
    except IniError as exc:
        raise ConfigError(str(exc)) from None
    try:
        stop_timeout = float(section.get("stop_timeout", "5"))
        max_sessions = int(section.get("max_sessions", "16"))
        per_user = int(section.get("max_sessions_per_user", "4"))
        io_timeout = float(section.get("io_timeout", "30"))
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    if not all(math.isfinite(v) and v > 0 for v in (stop_timeout, io_timeout)) or (
        min(max_sessions, per_user) <= 0
    ):
        raise ConfigError(
            f"{origin}: stop_timeout, io_timeout and the session limits must be positive"
        )
    return LoaderConfig(
        socket_path=Path(section.get("socket", str(DEFAULT_SOCKET))),
        stapbpf=section.get("stapbpf", "stapbpf"),
        staprun=section.get("staprun", "staprun"),
        signer_store=Path(section.get("signer_store", str(paths.signers))),
        stop_timeout=stop_timeout,
        max_sessions=max_sessions,
        max_sessions_per_user=per_user,
        io_timeout=io_timeout,
    )


def read_config(path: Path | None, paths: StorePaths) -> LoaderConfig:
    """Read ``path`` (or the default file if it exists; else use defaults)."""
    explicit = path is not None
    file = path if path is not None else default_config_file(paths)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{file}: no such configuration file") from None
        text = ""
    except OSError as exc:
        raise ConfigError(f"{file}: {exc.strerror}") from None
    return parse_config(text, str(file), paths)


def resolve_tool(name: str) -> str:
    """An absolute path for ``name``: as given if it has a slash, else from SYSTEM_PATH."""
    if "/" in name:
        if not Path(name).is_absolute():
            raise ConfigError(f"tool path {name!r} must be absolute")
        return name
    found = shutil.which(name, path=SYSTEM_PATH)
    if found is None:
        raise ConfigError(f"{name} not found in {SYSTEM_PATH}")
    return found
