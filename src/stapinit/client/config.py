"""``stap-client``'s configuration: ``/etc/systemtap/client.conf``, then
``~/.systemtap/client.conf`` (later settings win).

Section ``[client]``::

    servers = 192.0.2.7:5432 [2001:db8::1]:5432   # tried in order
    runtime = bpf                                  # when no --runtime is given
    loader_socket = /run/stap-loader.sock          # stap-loader, for non-root users
    stapbpf = stapbpf                              # what root runs .bo modules with
    staprun = staprun                              # what root runs .ko modules with
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from stapinit.client.options import ServerAddress, UsageError, parse_server
from stapinit.core.inifile import IniError, read_section
from stapinit.core.runtime import RuntimeKind
from stapinit.loader.config import DEFAULT_SOCKET
from stapinit.trust.stores import StorePaths

CONFIG_NAME: Final = "client.conf"
_KEYS: Final = frozenset({"servers", "runtime", "loader_socket", "stapbpf", "staprun"})


class ClientConfigError(Exception):
    """A configuration file is unusable; ``str()`` is one line."""


@dataclass(frozen=True)
class ClientConfig:
    """Settings from the configuration files."""

    servers: tuple[ServerAddress, ...] = ()
    runtime: RuntimeKind | None = None
    loader_socket: Path = DEFAULT_SOCKET
    stapbpf: str = "stapbpf"
    staprun: str = "staprun"


def config_files(paths: StorePaths) -> list[Path]:
    """The configuration files read, in order."""
    files = [paths.sysconf / CONFIG_NAME]
    if paths.user_dir is not None:
        files.append(paths.user_dir / CONFIG_NAME)
    return files


def apply_config_text(
    base: ClientConfig, text: str, origin: str, default_port: int
) -> ClientConfig:
    """``base`` updated by the settings in ``text`` (pure)."""
    try:
        section = read_section(text, origin, "client", _KEYS)
    except IniError as exc:
        raise ClientConfigError(str(exc)) from None
    config = base
    try:
        if "servers" in section:
            servers = tuple(parse_server(s, default_port) for s in section["servers"].split())
            config = replace(config, servers=servers)
    except UsageError as exc:
        raise ClientConfigError(f"{origin}: {exc}") from None
    if "runtime" in section:
        runtime = section["runtime"].strip()
        if runtime not in ("bpf", "kmod"):
            raise ClientConfigError(f"{origin}: runtime must be bpf or kmod")
        config = replace(config, runtime="bpf" if runtime == "bpf" else "kmod")
    if "loader_socket" in section:
        config = replace(config, loader_socket=Path(section["loader_socket"].strip()))
    if "stapbpf" in section:
        config = replace(config, stapbpf=section["stapbpf"].strip())
    if "staprun" in section:
        config = replace(config, staprun=section["staprun"].strip())
    return config


def read_client_config(paths: StorePaths, default_port: int) -> ClientConfig:
    """Read every configuration file that exists."""
    config = ClientConfig()
    for file in config_files(paths):
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ClientConfigError(f"{file}: {exc.strerror}") from None
        config = apply_config_text(config, text, str(file), default_port)
    return config
