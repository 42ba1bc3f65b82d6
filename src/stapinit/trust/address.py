"""Addresses of stap-servers: ``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT``.

Shared by ``stap-client`` (``--server``, ``client.conf``) and systemtap-service
(``COMPILE_SERVER``).  Pure and standard-library only: the boot-time command
parses its configuration with it without loading TLS or crypto code.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


class AddressError(ValueError):
    """Text that is not a server address; ``str()`` is one line."""


@dataclass(frozen=True)
class ServerAddress:
    """A server named by the user or a configuration file."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, default_port: int) -> ServerAddress:
    """Parse ``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT``; raises AddressError."""
    host, port_text = text, None
    if text.startswith("["):
        close = text.find("]")
        rest = text[close + 1 :] if close >= 0 else ""
        if close < 0 or (rest and not rest.startswith(":")):
            raise AddressError(f"invalid server address {text!r}")
        host, port_text = text[1:close], (rest[1:] if rest else None)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"invalid IPv6 address in {text!r}") from None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise AddressError(f"invalid server address {text!r} (write IPv6 addresses as [ADDR]:PORT)")
    if not host:
        raise AddressError(f"invalid server address {text!r}: no host")
    if port_text is None:
        return ServerAddress(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AddressError(f"invalid port in server address {text!r}")
    return ServerAddress(host, int(port_text))
