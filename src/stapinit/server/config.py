"""stap-server's configuration file: ``KEY=value`` lines in shell syntax.

The syntax is systemtap-service's (parsed by :mod:`stapinit.core.bashvars`, so
quoting and ``$NAME`` work and nothing is ever executed).  Every key has a default;
an unknown key or a bad value is an error naming the file and line.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from stapinit.core.bashvars import ConfigError, parse_assignments
from stapinit.protocol import DEFAULT_PORT

DEFAULT_CONFIG: Final = Path("/etc/stap-server/stap-server.conf")


class BadConfig(Exception):
    """The configuration cannot be used; ``str()`` is one line naming file and line."""


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one stap-server instance (defaults are the packaged ones)."""

    port: int = DEFAULT_PORT
    listen_address: str = "127.0.0.1"
    state_dir: Path = Path("/var/lib/stap-server")
    log_file: Path = Path("/var/log/stap-server/stap-server.log")
    pid_file: Path = Path("/run/stap-server/stap-server.pid")
    user: str = "stap-server"
    stap: str = "stap"
    #: Kernel releases to compile for; empty means every release in /lib/modules
    #: that has a build tree.
    releases: tuple[str, ...] = ()
    max_request_size: int = 8 * 1024 * 1024
    #: Concurrent compiles; 0 means the number of CPUs.
    max_compiles: int = 0
    queue_size: int = 16
    queue_timeout: float = 60.0
    compile_timeout: float = 300.0
    compile_memory: int = 2 * 1024 * 1024 * 1024
    io_timeout: float = 30.0
    max_connections: int = 64
    #: Size bound of the compile cache in bytes; 0 disables the cache.
    cache_size: int = 512 * 1024 * 1024
    cert_days: int = 5 * 365

    @property
    def workers(self) -> int:
        """Concurrent compiles, with 0 resolved to the CPU count."""
        return self.max_compiles or os.cpu_count() or 1

    @property
    def cert_dir(self) -> Path:
        """Where the certificate clients are told to authorize lives (§6.1.3)."""
        return self.state_dir / ".systemtap" / "ssl" / "server"


_SIZE_UNITS: Final = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def _size(text: str) -> int:
    match = re.fullmatch(r"([0-9]{1,15})([KMG]?)", text.strip().upper())
    if not match:
        raise ValueError("expected a size in bytes, optionally with K, M or G")
    return int(match[1]) * _SIZE_UNITS[match[2]]


def _count(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]{1,9}", text.strip()):
            raise ValueError("expected a whole number")
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}")
        return value

    return parse


def _seconds(text: str) -> float:
    if not re.fullmatch(r"[0-9]{1,7}(\.[0-9]{1,3})?", text.strip()):
        raise ValueError("expected a number of seconds")
    value = float(text)
    if value <= 0:
        raise ValueError("expected more than 0 seconds")
    return value


def _address(text: str) -> str:
    return str(ipaddress.ip_address(text.strip()))


def _abs_path(text: str) -> Path:
    if not text.startswith("/"):
        raise ValueError("expected an absolute path")
    return Path(text)


def _word(text: str) -> str:
    if not text or any(c.isspace() for c in text):
        raise ValueError("expected a single word")
    return text


def _releases(text: str) -> tuple[str, ...]:
    words = tuple(text.split())
    for word in words:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+~-]*", word):
            raise ValueError(f"{word!r} is not a kernel release")
    return words


# Config key -> (field name, parser).
_KEYS: Final[Mapping[str, tuple[str, Callable[[str], Any]]]] = {
    "PORT": ("port", _count(1, 65535)),
    "LISTEN_ADDRESS": ("listen_address", _address),
    "STATE_DIR": ("state_dir", _abs_path),
    "LOG_FILE": ("log_file", _abs_path),
    "PID_FILE": ("pid_file", _abs_path),
    "USER": ("user", _word),
    "STAP": ("stap", _word),
    "RELEASES": ("releases", _releases),
    "MAX_REQUEST_SIZE": ("max_request_size", _size),
    "MAX_COMPILES": ("max_compiles", _count(0, 4096)),
    "QUEUE_SIZE": ("queue_size", _count(0, 100000)),
    "QUEUE_TIMEOUT": ("queue_timeout", _seconds),
    "COMPILE_TIMEOUT": ("compile_timeout", _seconds),
    "COMPILE_MEMORY": ("compile_memory", _size),
    "IO_TIMEOUT": ("io_timeout", _seconds),
    "MAX_CONNECTIONS": ("max_connections", _count(1, 100000)),
    "CACHE_SIZE": ("cache_size", _size),
    "CERT_DAYS": ("cert_days", _count(1, 36500)),
}
assert {name for name, _ in _KEYS.values()} == {f.name for f in fields(ServerConfig)}


def parse_config(text: str, filename: str) -> ServerConfig:
    """Parse config file text; raises BadConfig (``FILE:LINE: message``)."""
    try:
        assignments = parse_assignments(text, filename, {})
    except ConfigError as exc:
        raise BadConfig(str(exc)) from None
    values: dict[str, Any] = {}
    for assignment in assignments:
        where = f"{filename}:{assignment.line}"
        entry = _KEYS.get(assignment.name)
        if entry is None:
            raise BadConfig(
                f"{where}: unknown setting {assignment.name} (known: {', '.join(sorted(_KEYS))})"
            )
        name, parse = entry
        try:
            values[name] = parse(assignment.value)
        except ValueError as exc:
            raise BadConfig(f"{where}: {assignment.name}={assignment.value!r}: {exc}") from None
    return ServerConfig(**values)


def load_config(path: Path | None) -> ServerConfig:
    """Read the config file; the default file may be absent (then defaults apply)."""
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return ServerConfig()
        path = DEFAULT_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise BadConfig(f"{path}: cannot read config file: {reason}") from None
    return parse_config(text, str(path))
