"""Server pinning: an untrusted server learns nothing from the client."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stapinit.trust.address import ServerAddress
from stapinit.trust.certs import fingerprint, generate_identity
from stapinit.trust.connection import ServerUntrustedError, connect_pinned


@dataclass
class TlsListener:
    """A TLS server on loopback that records what each client sent."""

    address: ServerAddress
    fingerprint: str
    received: list[bytes] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def tls_listener(tmp_path: Path) -> Iterator[TlsListener]:
    _key, cert = generate_identity(tmp_path / "k.pem", tmp_path / "c.pem", "localhost")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    raw = socket.create_server(("127.0.0.1", 0))
    listener = TlsListener(ServerAddress("127.0.0.1", raw.getsockname()[1]), fingerprint(cert))

    def serve() -> None:
        conn, _ = raw.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(10)
            data = b""
            try:
                while chunk := tls.recv(4096):
                    data += chunk
            except (ssl.SSLError, OSError):
                pass
            listener.received.append(data)
        listener.done.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener
    raw.close()
    thread.join(10)


def test_untrusted_server_gets_nothing(tls_listener: TlsListener) -> None:
    with pytest.raises(ServerUntrustedError) as info:
        connect_pinned(tls_listener.address, {"SHA256:" + "00" * 32})
    assert str(info.value) == (
        f"Server {tls_listener.address} is not trusted (certificate "
        f"{tls_listener.fingerprint}). Authorize it with: stap-authorize-server-cert <certfile>"
    )
    assert tls_listener.done.wait(10)
    assert tls_listener.received == [b""]


def test_trusted_server_is_talked_to(tls_listener: TlsListener) -> None:
    conn = connect_pinned(tls_listener.address, {tls_listener.fingerprint})
    conn.request("GET", "/")
    conn.close()
    assert tls_listener.done.wait(10)
    assert tls_listener.received[0].startswith(b"GET / HTTP/1.1\r\n")
