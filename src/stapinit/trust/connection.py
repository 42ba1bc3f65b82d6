"""Talking to a stap-server over TLS, pinned to the certificates the user trusts.

Used by ``stap-client`` and by systemtap-service's ``COMPILE_SERVER``.

Server certificates are self-signed, so neither a CA nor the host name says
anything.  Instead the TLS handshake proves the server holds the key of the
certificate it shows, and that certificate's fingerprint must be in a trust
store.  The check happens right after the handshake, before a byte of the
request is sent.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection
from typing import Final

from cryptography import x509

from stapinit.protocol import (
    COMPILE_PATH,
    CONTENT_TYPE,
    MAX_MODULE_BYTES,
    MAX_STREAM_CHARS,
    CompileRequest,
    CompileResponse,
    ProtocolError,
    decode_compile_response,
    decode_error,
    encode_compile_request,
)
from stapinit.trust.address import ServerAddress
from stapinit.trust.certs import fingerprint as cert_fingerprint

CONNECT_TIMEOUT: Final = 10.0
#: A compile may legitimately take minutes for a big kernel-module script.
COMPILE_TIMEOUT: Final = 600.0
#: How often a wait polls the caller's ``interrupted`` (seconds).
POLL_INTERVAL: Final = 0.1
#: Largest response read: the largest module in base64, stap's messages (the
#: server keeps :data:`~stapinit.protocol.MAX_STREAM_CHARS` of each, which JSON
#: escaping may grow sixfold), and 1 MiB for the signature and the rest.
MAX_RESPONSE: Final = (MAX_MODULE_BYTES + 2) // 3 * 4 + 2 * 6 * MAX_STREAM_CHARS + 1024 * 1024


class ServerError(Exception):
    """A server could not be used; ``str()`` is one line."""


class ServerUntrustedError(ServerError):
    """The server's certificate is in no trust store the user relies on."""

    def __init__(self, address: ServerAddress, fingerprint: str) -> None:
        super().__init__(
            f"Server {address} is not trusted (certificate {fingerprint}). "
            f"Authorize it with: stap-authorize-server-cert <certfile>"
        )
        self.fingerprint = fingerprint


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Trust comes from pinning (below), not from CAs or host names.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Deadline:
    """A whole-request deadline: ends a blocking exchange with a server in time.

    A watcher thread shuts the socket down (``shutdown(2)``, which wakes a
    blocked ``connect``/``recv``/``send`` at once) when ``timeout`` seconds
    have passed since creation, or when ``interrupted()`` (polled every
    :data:`POLL_INTERVAL` s) turns true.  A per-operation socket timeout alone
    would let a server that trickles a byte at a time hold the client forever.
    Use as a context manager; :attr:`reason` says why it fired, if it did.
    """

    def __init__(self, timeout: float, interrupted: Callable[[], bool] | None = None) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout
        self._interrupted = interrupted
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        #: ``"timeout"`` or ``"interrupted"`` once the deadline has fired.
        self.reason: str | None = None
        self._thread = threading.Thread(target=self._watch, name="server-deadline", daemon=True)
        self._thread.start()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def remaining(self) -> float:
        """Seconds left, at least a millisecond (a socket timeout of 0 means non-blocking)."""
        return max(self._end - time.monotonic(), 0.001)

    def attach(self, sock: socket.socket | None) -> None:
        """Make ``sock`` the socket to shut down (None: none); shut at once if already fired."""
        with self._lock:
            self._sock = sock
            if self.reason is not None:
                self._shutdown()

    def _watch(self) -> None:
        while True:
            left = self._end - time.monotonic()
            step = left if self._interrupted is None else min(left, POLL_INTERVAL)
            if self._stop.wait(max(step, 0)):
                return
            if self._interrupted is not None and self._interrupted():
                reason = "interrupted"
            elif time.monotonic() >= self._end:
                reason = "timeout"
            else:
                continue
            with self._lock:
                self.reason = reason
                self._shutdown()
            return

    def _shutdown(self) -> None:
        if self._sock is None:
            return
        # The plain socket's shutdown: SSLSocket's own would drop its TLS state under
        # the feet of the thread reading from it. An error: closed, or never connected.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def error(self, address: ServerAddress) -> ServerError | None:
        """The error to report in place of the I/O error a fired deadline caused."""
        if self.reason == "interrupted":
            return ServerError(f"interrupted while waiting for server {address}")
        if self.reason == "timeout":
            return ServerError(f"server {address} did not answer within {self.timeout:g} s")
        return None


def _open_socket(address: ServerAddress, deadline: Deadline) -> socket.socket:
    """A TCP connection to ``address`` (each address it resolves to, in turn)."""
    last: OSError = OSError(f"{address.host} resolves to no address")
    for family, kind, proto, _name, sockaddr in socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        sock.settimeout(min(CONNECT_TIMEOUT, deadline.remaining()))
        deadline.attach(sock)
        try:
            sock.connect(sockaddr)
        except OSError as exc:
            deadline.attach(None)
            sock.close()
            last = exc
            if deadline.reason is not None:
                break
            continue
        return sock
    raise last


def connect_pinned(
    address: ServerAddress, trusted: Collection[str], deadline: Deadline | None = None
) -> http.client.HTTPConnection:
    """An HTTPS connection to ``address`` whose certificate is one of ``trusted``.

    ``deadline`` bounds connect and handshake and stays attached to the
    connection for what follows (:func:`compile_remote`); without one, a
    :data:`COMPILE_TIMEOUT` deadline is used for the connection alone.
    Raises ServerUntrustedError (nothing has been sent) or ServerError.
    """
    if deadline is None:
        with Deadline(COMPILE_TIMEOUT) as own:
            return connect_pinned(address, trusted, own)
    tls: ssl.SSLSocket | None = None
    try:
        raw = _open_socket(address, deadline)
        raw.settimeout(deadline.remaining())
        tls = _tls_context().wrap_socket(
            raw, server_hostname=address.host, do_handshake_on_connect=False
        )
        deadline.attach(tls)
        tls.do_handshake()
    except (OSError, ssl.SSLError) as exc:
        deadline.attach(None)
        if tls is not None:
            tls.close()
        raise deadline.error(address) or ServerError(
            f"cannot connect to server {address}: {_why(exc)}"
        ) from None
    conn = http.client.HTTPConnection(address.host, address.port)
    conn.sock = tls
    der = tls.getpeercert(binary_form=True)
    if der is None:
        conn.close()
        raise ServerError(f"server {address} presented no certificate")
    try:
        fingerprint = cert_fingerprint(x509.load_der_x509_certificate(der))
    except ValueError:
        conn.close()
        raise ServerError(f"server {address} presented an unreadable certificate") from None
    if fingerprint not in trusted:
        conn.close()
        raise ServerUntrustedError(address, fingerprint)
    return conn


def compile_remote(
    conn: http.client.HTTPConnection,
    address: ServerAddress,
    req: CompileRequest,
    deadline: Deadline | None = None,
) -> CompileResponse:
    """Send ``req`` on a pinned connection and return the server's answer.

    ``deadline`` (the one the connection was made under) bounds sending the
    request and reading the answer; without one, :data:`COMPILE_TIMEOUT`.
    The answer is refused (ServerError) above :data:`MAX_RESPONSE` bytes,
    before it is decoded, and with a module over ``MAX_MODULE_BYTES``.
    """
    if deadline is None:
        with Deadline(COMPILE_TIMEOUT) as own:
            return compile_remote(conn, address, req, own)
    try:
        body = encode_compile_request(req)
    except ProtocolError as exc:
        conn.close()
        raise ServerError(str(exc)) from None
    if conn.sock is not None:
        deadline.attach(conn.sock)
        conn.sock.settimeout(deadline.remaining())
    try:
        conn.request("POST", COMPILE_PATH, body=body, headers={"Content-Type": CONTENT_TYPE})
        response = conn.getresponse()
        length = response.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > MAX_RESPONSE:
            raise ServerError(f"server {address} sent an answer over {MAX_RESPONSE} bytes")
        data = response.read(MAX_RESPONSE + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise deadline.error(address) or ServerError(
            f"server {address} failed: {_why(exc)}"
        ) from None
    finally:
        deadline.attach(None)
        conn.close()
    # A shut-down socket may also read as the end of a (short) answer.
    fired = deadline.error(address)
    if fired is not None:
        raise fired
    if len(data) > MAX_RESPONSE:
        raise ServerError(f"server {address} sent an answer over {MAX_RESPONSE} bytes")
    if response.status != 200:
        raise ServerError(f"server {address} refused the request: {decode_error(data)}")
    try:
        answer = decode_compile_response(data)
    except ProtocolError as exc:
        raise ServerError(f"server {address} sent a bad answer: {exc}") from None
    if answer.module is not None and len(answer.module.data) > MAX_MODULE_BYTES:
        raise ServerError(
            f"server {address} sent a module over {MAX_MODULE_BYTES} bytes, "
            "more than stap-loader accepts"
        )
    return answer


def compile_on(
    address: ServerAddress,
    trusted: Collection[str],
    req: CompileRequest,
    timeout: float = COMPILE_TIMEOUT,
    interrupted: Callable[[], bool] | None = None,
) -> CompileResponse:
    """Compile ``req`` on ``address``: connect, TLS, request and answer within ``timeout`` s.

    ``interrupted`` (polled) ends the wait early.  Raises ServerUntrustedError
    (nothing has been sent) or ServerError (one line).
    """
    with Deadline(timeout, interrupted) as deadline:
        return compile_remote(connect_pinned(address, trusted, deadline), address, req, deadline)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__
