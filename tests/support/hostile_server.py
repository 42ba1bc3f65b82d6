"""A hostile stap-server for tests: a real TLS listener on loopback whose certificate the
test may trust, answering every request as its ``answer`` function says."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from stapinit.trust.address import ServerAddress
from stapinit.trust.certs import fingerprint, generate_identity

#: Writes the server's side of one exchange on the TLS socket (the request has been
#: read); the event is set when the server stops, to end an answer that never would.
Answer = Callable[[ssl.SSLSocket, threading.Event], None]


class HostileServer:
    """Accepts TLS connections in a thread; each is answered by ``answer`` in its own."""

    def __init__(self, directory: Path, answer: Answer) -> None:
        self.cert_path = directory / "hostile.cert"
        _key, cert = generate_identity(directory / "hostile.key", self.cert_path, "hostile")
        self.fingerprint = fingerprint(cert)
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(self.cert_path, directory / "hostile.key")
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = ServerAddress("127.0.0.1", self._listener.getsockname()[1])
        self.stopped = threading.Event()
        #: Requests whose answer has begun.
        self.requests = 0

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        try:
            with self._ctx.wrap_socket(raw, server_side=True) as tls:
                tls.settimeout(10)
                _read_request(tls)
                self.requests += 1
                self._answer(tls, self.stopped)
        except (OSError, ssl.SSLError):
            pass  # the client hung up: what the tests want it to do

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close would not)
        self._listener.close()


def _read_request(tls: ssl.SSLSocket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            raise ConnectionError("client went away")
        body += chunk


@contextmanager
def hostile_server(directory: Path, answer: Answer) -> Iterator[HostileServer]:
    """A running :class:`HostileServer`, stopped on exit (trickling answers end with it)."""
    server = HostileServer(directory, answer)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(10)


def trickle(tls: ssl.SSLSocket, stopped: threading.Event, interval: float = 0.5) -> None:
    """A status line, then one byte every ``interval`` s until ``stopped`` (never a full answer)."""
    tls.sendall(b"HTTP/1.1 200 OK\r\n")
    while not stopped.wait(interval):
        tls.sendall(b"X")


def send_json(tls: ssl.SSLSocket, body: bytes, length: int | None = None) -> None:
    """A 200 answer with ``body`` (``length`` may claim another Content-Length)."""
    size = len(body) if length is None else length
    tls.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
    )
    tls.sendall(body)
