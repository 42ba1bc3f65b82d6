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
from stapinit.trust.connection import (
    ServerError,
    ServerUntrustedError,
    compile_remote,
    connect_pinned,
)
from tests.server.helpers import bpf_request


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


def answering_server(tmp_path: Path, status: int, body: bytes) -> tuple[ServerAddress, str]:
    """A trusted-looking TLS server that answers one request with ``status`` and ``body``."""
    _key, cert = generate_identity(tmp_path / "k.pem", tmp_path / "c.pem", "localhost")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    raw = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with raw:
            conn, _ = raw.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(10)
                request = b""
                while b"\r\n\r\n" not in request:
                    request += tls.recv(4096)
                length = int(request.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                body_seen = len(request.split(b"\r\n\r\n", 1)[1])
                while body_seen < length:
                    body_seen += len(tls.recv(65536))
                tls.sendall(
                    b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                    % (status, len(body))
                    + body
                )

    threading.Thread(target=serve, daemon=True).start()
    return ServerAddress("127.0.0.1", raw.getsockname()[1]), fingerprint(cert)


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            200,
            b'{"status": ' + b"1" * 5000 + b"}",
            "sent a bad answer: compile response is not acceptable JSON",
        ),
        (200, b"[" * 50000 + b"]" * 50000, "sent a bad answer: compile response: nested deeper"),
        (200, b'{"status": 0}', "sent a bad answer: compile response: missing field"),
        (200, b"\xff\xfe", "sent a bad answer: compile response is not UTF-8 text"),
        (500, b'{"error": ' + b"2" * 5000 + b"}", 'refused the request: {"error": 2222'),
        (400, b"[" * 50000, "refused the request: [[[["),
    ],
)
def test_a_hostile_servers_answer_is_one_line(
    tmp_path: Path, status: int, body: bytes, message: str
) -> None:
    # Issue 10 #9, the client's side: whatever a trusted server sends back.
    address, fp = answering_server(tmp_path, status, body)
    with pytest.raises(ServerError) as info:
        compile_remote(connect_pinned(address, {fp}), address, bpf_request())
    assert str(info.value).startswith(f"server {address} {message}"), str(info.value)
    assert "\n" not in str(info.value)
