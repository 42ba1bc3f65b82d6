"""``stap-client``'s configuration: ``/etc/systemtap/client.conf``, then
``~/.systemtap/client.conf`` (later settings win).

Section ``[client]``::

    servers = 192.0.2.7:5432 [2001:db8::1]:5432   # tried in order
    runtime = bpf                                  # when no --runtime is given
    loader_socket = /run/stap-loader.sock          # stap-loader, for non-root users
    stapbpf = stapbpf                              # what root runs .bo modules with
    staprun = staprun                              # what root runs .ko modules with

Run as root, the client reads only files that root alone can change
(:func:`stapinit.core.tools.root_only_problem`): with ``sudo -E`` the home
directory, and ``$STAP_TRUST_ROOT``, may be a user's, and a user's file must
never choose what root runs. Others are skipped with a warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from stapinit.client.options import parse_server
from stapinit.core import values
from stapinit.core.errors import StapinitError
from stapinit.core.inifile import IniError, read_ini_file, read_section, setting_line
from stapinit.core.runtime import RuntimeKind, parse_kind
from stapinit.core.tools import root_only_problem
from stapinit.loader_wire import DEFAULT_SOCKET
from stapinit.trust.address import ServerAddress
from stapinit.trust.stores import StorePaths

CONFIG_NAME: Final = "client.conf"
SECTION: Final = "client"
_KEYS: Final = frozenset({"servers", "runtime", "loader_socket", "stapbpf", "staprun"})


class ClientConfigError(StapinitError):
    """A configuration file is unusable; ``str()`` is ``FILE[:LINE]: why``."""


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


def _apply(config: ClientConfig, key: str, value: str, default_port: int) -> ClientConfig:
    """``config`` with one setting in place; ValueError (one line) for a bad value."""
    if key == "servers":
        return replace(config, servers=tuple(parse_server(s, default_port) for s in value.split()))
    if key == "runtime":
        try:
            return replace(config, runtime=parse_kind(value))
        except ValueError:
            raise ValueError("runtime must be bpf or kmod") from None
    if key == "loader_socket":
        return replace(config, loader_socket=Path(values.absolute_path(value)))
    if key == "stapbpf":
        return replace(config, stapbpf=values.tool(value))
    return replace(config, staprun=values.tool(value))


def apply_config_text(
    base: ClientConfig, text: str, origin: str, default_port: int
) -> ClientConfig:
    """``base`` updated by the settings in ``text`` (pure); ClientConfigError names FILE:LINE."""
    try:
        section = read_section(text, origin, SECTION, _KEYS)
    except IniError as exc:
        raise ClientConfigError(str(exc)) from None
    config = base
    for key, value in section.items():
        try:
            config = _apply(config, key, value.strip(), default_port)
        except ValueError as exc:
            line = setting_line(text, SECTION, key)
            where = f"{origin}:{line}" if line else origin
            raise ClientConfigError(f"{where}: {exc}") from None
    return config


def read_client_config(
    paths: StorePaths, default_port: int, as_root: bool, warn: Callable[[str], None]
) -> ClientConfig:
    """Read every configuration file that exists.

    With ``as_root``, a file that others could change is skipped (``warn`` says
    why) before it is opened. Raises ClientConfigError for a file that cannot
    be read or parsed.
    """
    config = ClientConfig()
    for file in config_files(paths):
        if as_root and os.path.lexists(file):
            reason = root_only_problem(file)
            if reason:
                warn(f"ignoring {file}: root reads only files that root alone can change: {reason}")
                continue
        try:
            text = read_ini_file(file)
        except IniError as exc:
            raise ClientConfigError(str(exc)) from None
        if text is None:
            continue
        config = apply_config_text(config, text, str(file), default_port)
    return config
