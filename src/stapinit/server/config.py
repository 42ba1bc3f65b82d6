"""stap-server's configuration file: ``KEY=value`` lines in shell syntax.

The syntax is systemtap-service's (parsed by :mod:`stapinit.core.bashvars`, so
quoting and ``$NAME`` work and nothing is ever executed).  Every key has a default;
an unknown key or a bad value is an error naming the file and line.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from stapinit.core import values
from stapinit.core.bashvars import ConfigError, parse_assignments
from stapinit.core.errors import ConfigFileError
from stapinit.protocol import DEFAULT_PORT

DEFAULT_CONFIG: Final = Path("/etc/stap-server/stap-server.conf")


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
    #: Compile in the bubblewrap sandbox (see :mod:`stapinit.server.sandbox`).
    sandbox: bool = True
    #: More host paths compiles may read (programs to probe, say).
    sandbox_paths: tuple[Path, ...] = ()
    max_request_size: int = 8 * 1024 * 1024
    #: Concurrent compiles; 0 means the number of CPUs.
    max_compiles: int = 0
    queue_size: int = 16
    queue_timeout: float = 60.0
    compile_timeout: float = 300.0
    compile_memory: int = 2 * 1024 * 1024 * 1024
    #: Time for the TLS handshake and the request's head (request line, headers);
    #: IO_TIMEOUT when that is shorter.
    handshake_timeout: float = 5.0
    io_timeout: float = 30.0
    max_connections: int = 64
    #: Connections one client address (an IPv6 /64) may hold at once.
    max_connections_per_client: int = 4
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


def _count(low: int, high: int) -> Callable[[str], int]:
    return lambda text: values.count(text, low, high)


def _address(text: str) -> str:
    return str(ipaddress.ip_address(text.strip()))


def _path(text: str) -> Path:
    return Path(values.absolute_path(text))


def _word(text: str) -> str:
    if not text or any(c.isspace() for c in text) or "\0" in text:
        raise ValueError(f"{text!r} is not a single word")
    return text


def _paths(text: str) -> tuple[Path, ...]:
    return tuple(_path(word) for word in text.split())


def _releases(text: str) -> tuple[str, ...]:
    return tuple(values.release(word) for word in text.split())


# Config key -> (field name, parser).
_KEYS: Final[Mapping[str, tuple[str, Callable[[str], Any]]]] = {
    "PORT": ("port", _count(1, 65535)),
    "LISTEN_ADDRESS": ("listen_address", _address),
    "STATE_DIR": ("state_dir", _path),
    "LOG_FILE": ("log_file", _path),
    "PID_FILE": ("pid_file", _path),
    "USER": ("user", _word),
    "STAP": ("stap", values.tool),
    "RELEASES": ("releases", _releases),
    "SANDBOX": ("sandbox", values.boolean),
    "SANDBOX_PATHS": ("sandbox_paths", _paths),
    "MAX_REQUEST_SIZE": ("max_request_size", values.size),
    "MAX_COMPILES": ("max_compiles", _count(0, 4096)),
    "QUEUE_SIZE": ("queue_size", _count(0, 100000)),
    "QUEUE_TIMEOUT": ("queue_timeout", values.seconds),
    "COMPILE_TIMEOUT": ("compile_timeout", values.seconds),
    "COMPILE_MEMORY": ("compile_memory", values.size),
    "HANDSHAKE_TIMEOUT": ("handshake_timeout", values.seconds),
    "IO_TIMEOUT": ("io_timeout", values.seconds),
    "MAX_CONNECTIONS": ("max_connections", _count(1, 100000)),
    "MAX_CONNECTIONS_PER_CLIENT": ("max_connections_per_client", _count(1, 100000)),
    "CACHE_SIZE": ("cache_size", values.size),
    "CERT_DAYS": ("cert_days", _count(1, 36500)),
}
assert {name for name, _ in _KEYS.values()} == {f.name for f in fields(ServerConfig)}


def parse_config(text: str, filename: str) -> ServerConfig:
    """Parse config file text; raises ConfigFileError (``FILE:LINE: message``, exit 6)."""
    try:
        assignments = parse_assignments(text, filename, {})
    except ConfigError as exc:
        raise ConfigFileError(exc.filename, exc.line, exc.message) from None
    settings: dict[str, Any] = {}
    for assignment in assignments:
        entry = _KEYS.get(assignment.name)
        if entry is None:
            raise ConfigFileError(
                filename,
                assignment.line,
                f"unknown setting {assignment.name} (known: {', '.join(sorted(_KEYS))})",
            )
        name, parse = entry
        try:
            settings[name] = parse(assignment.value)
        except ValueError as exc:
            raise ConfigFileError(
                filename, assignment.line, f"{assignment.name}={assignment.value!r}: {exc}"
            ) from None
    return ServerConfig(**settings)


#: A configuration file is a few kilobytes; anything much larger is not one.
MAX_CONFIG_BYTES: Final = 1 << 20


def load_config(path: Path | None) -> ServerConfig:
    """Read the config file; the default file may be absent (then defaults apply).

    Only a regular file of at most :data:`MAX_CONFIG_BYTES` is read (never a FIFO
    or a device, which could block or never end); raises ConfigFileError.
    """
    if path is None:
        if not DEFAULT_CONFIG.exists():
            return ServerConfig()
        path = DEFAULT_CONFIG
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ConfigFileError(str(path), 0, "cannot read config file: not a regular file")
            data = handle.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigFileError(
                str(path), 0, f"cannot read config file: larger than {MAX_CONFIG_BYTES} bytes"
            )
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigFileError(str(path), 0, f"cannot read config file: {reason}") from None
    return parse_config(text, str(path))
