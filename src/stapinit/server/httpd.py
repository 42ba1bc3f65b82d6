"""The HTTPS front end: the standard library's threading HTTP server behind TLS.

One request per connection.  Each connection gets its own thread, at most
``MAX_CONNECTIONS`` in all and ``MAX_CONNECTIONS_PER_CLIENT`` per client address
(an IPv6 client counts by its /64, which one host usually holds whole), so one
source holding connections open cannot lock others out.  A connection has
``HANDSHAKE_TIMEOUT`` for the TLS handshake and the request's head (request
line and headers), then ``IO_TIMEOUT`` for the body, and again for sending the
answer; every read and write has a socket timeout too: a silent, trickling or
slow-reading client is cut off, so it never holds a thread for long.  Compiles
themselves are bounded separately (:class:`stapinit.server.app.CompileSlots`).
Every request is logged on one line: client, request, status, script hash,
options, result, duration; connections refused for a limit are logged at most
once a minute per client address, with the count of those not logged.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from stapinit import __version__
from stapinit.protocol import COMPILE_PATH, CONTENT_TYPE, INFO_PATH, encode_error
from stapinit.server.app import CompileApp, Outcome
from stapinit.server.identity import Identity, IdentityError
from stapinit.server.logfile import LOG

#: Seconds between two log lines about connections refused to one client.
DROP_LOG_INTERVAL: Final = 60.0
_PLAIN_HTTP_BODY: Final = encode_error("this server speaks HTTPS only; use https://")


def make_ssl_context(identity: Identity) -> ssl.SSLContext:
    """A server-side TLS context: TLS 1.2 at least, forward-secret AEAD ciphers only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2 only; 1.3 suites are all fine
    try:
        ctx.load_cert_chain(str(identity.cert_path), str(identity.key_path))
    except (OSError, ssl.SSLError) as exc:
        raise IdentityError(f"cannot load {identity.cert_path} for TLS: {exc}") from None
    return ctx


def format_fields(fields: dict[str, str]) -> str:
    """``key=value`` pairs on one line; values with spaces or quotes are JSON-quoted."""
    parts = []
    for key, value in fields.items():
        plain = value and value.isprintable() and not any(c in value for c in ' "=\\')
        parts.append(f"{key}={value if plain else json.dumps(value)}")
    return " ".join(parts)


class ConnectionClock:
    """Shuts a connection down unless cancelled within ``seconds``."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.expired = False
        self._sock = sock
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        # The plain socket's shutdown: it wakes a thread blocked reading the TLS socket.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        """The awaited transfer is done: stop the clock."""
        self._timer.cancel()


class Handler(BaseHTTPRequestHandler):
    """Answers ``GET /`` and ``POST /compile``; one request per connection."""

    server: StapHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = f"stap-server/{__version__}"

    def __init__(self, request: Any, client_address: Any, server: StapHTTPServer) -> None:
        # The first clock covers the TLS handshake and the request's head.
        self.deadline = ConnectionClock(request, server.limits.handshake_timeout)
        self.started = time.monotonic()
        self.http_status: int | None = None
        self.log_fields: dict[str, str] = {}
        self.note = ""
        self.timed_out = False
        try:
            super().__init__(request, client_address, server)
        finally:
            self.deadline.cancel()

    def version_string(self) -> str:
        """The ``Server`` header: no Python version advertised."""
        return self.server_version

    def handle(self) -> None:
        """Complete the TLS handshake, serve exactly one request, then log it."""
        # A backstop: the deadlines, slightly shorter, are what normally cut a client off.
        self.connection.settimeout(self.server.limits.io_timeout + 1)
        try:
            self.connection.do_handshake()
        except (OSError, ValueError) as exc:
            self._handshake_failed(exc)
            return
        try:
            self.handle_one_request()
        except OSError as exc:
            # The client went away or was cut off; there is nobody left to answer.
            self.timed_out = self.timed_out or isinstance(exc, TimeoutError)
            if not self.note:
                self.note = f"connection failed: {exc}"
        except Exception as exc:
            # A bug must cost one request, not a traceback per connection.
            LOG.exception("internal error while handling a request")
            self.note = f"internal error: {type(exc).__name__}"
            if self.http_status is None:
                with contextlib.suppress(Exception):
                    self._answer(Outcome(500, encode_error("internal server error")))
        finally:
            self._log_request()

    def _handshake_failed(self, exc: Exception) -> None:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        if self.deadline.expired or isinstance(exc, TimeoutError):
            self.timed_out = True
            reason = "timeout"
        if reason == "HTTP_REQUEST":
            # A plain-HTTP client: tell it in its own language, on the bare socket.
            head = (
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(_PLAIN_HTTP_BODY)}\r\nConnection: close\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                socket.socket.sendall(self.connection, head.encode("ascii") + _PLAIN_HTTP_BODY)
            self.http_status = 400
        self.log_fields["result"] = f"tls-failed: {reason}"
        self._log_request()

    def _resource(self) -> str:
        """The request's path without its query; the head is complete: the body's clock starts."""
        self.deadline.cancel()
        if not self.deadline.expired:
            self.deadline = ConnectionClock(self.connection, self.server.limits.io_timeout)
        return self.path.partition("?")[0]

    def do_GET(self) -> None:
        """``GET /``: the server's description."""
        if self._resource() == INFO_PATH:
            self._answer(self.server.app.server_info())
        else:
            self._answer(Outcome(404, encode_error(f"no such resource: {self.path}")))

    def do_POST(self) -> None:
        """``POST /compile``: read the (bounded) body and compile."""
        if self._resource() != COMPILE_PATH:
            self._answer(Outcome(404, encode_error(f"no such resource: {self.path}")))
            return
        length = self._acceptable_length()
        if length is None:
            return
        body = self.rfile.read(length)
        self.deadline.cancel()
        if self.deadline.expired or len(body) < length:
            self.note = "client did not send the whole request in time"
            self.close_connection = True
            return
        try:
            outcome = self.server.app.compile(body)
        except Exception:
            # A bug must cost one request, not the connection without an answer.
            LOG.exception("internal error while compiling")
            outcome = Outcome(500, encode_error("internal server error; see the server's log"))
        self._answer(outcome)

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it."""
        if self.command == "POST" and self._acceptable_length() is None:
            return False
        return super().handle_expect_100()

    def _acceptable_length(self) -> int | None:
        """The body's length, or None after answering 411/400/413 (body left unread)."""
        if self.headers.get("Transfer-Encoding") is not None:
            self._answer(Outcome(411, encode_error("send the body with a Content-Length")))
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._answer(Outcome(411, encode_error("a Content-Length is required")))
            return None
        if not re.fullmatch(r"[0-9]{1,18}", raw.strip()):
            self._answer(Outcome(400, encode_error(f"invalid Content-Length {raw!r}")))
            return None
        length = int(raw)
        limit = self.server.limits.max_request_size
        if length > limit:
            message = f"request of {length} bytes exceeds this server's limit of {limit} bytes"
            self._answer(Outcome(413, encode_error(message), log={"result": "too-large"}))
            return None
        return length

    def _answer(self, outcome: Outcome) -> None:
        self.deadline.cancel()
        if self.deadline.expired:
            self.close_connection = True
            return  # the connection is already shut: nothing can be sent
        self.http_status = outcome.status
        self.log_fields.update(outcome.log)
        self.close_connection = True
        # http.server answers what it takes for HTTP/0.9 with a bare body; this
        # server speaks HTTP/1.1 only, so every answer gets its status line.
        self.request_version = "HTTP/1.1"
        self.send_response(outcome.status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(outcome.body)))
        self.send_header("Connection", "close")
        for name, value in outcome.headers.items():
            self.send_header(name, value)
        # A client that reads the answer too slowly is cut off like a slow sender.
        deadline = ConnectionClock(self.connection, self.server.limits.io_timeout)
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(outcome.body)
        finally:
            deadline.cancel()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by the HTTP layer get the same JSON body as the server's own."""
        text = message or HTTPStatus(code).phrase
        self.note = text
        self._answer(Outcome(code, encode_error(f"{code} {text}")))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Requests are logged once, complete, by :meth:`handle`."""

    def log_message(self, format: str, *args: Any) -> None:
        """Keep http.server's remarks for this request's log line, not stderr."""
        self.note = format % args

    def _log_request(self) -> None:
        host, port = self.client_address[:2]
        fields = {
            "client": f"{host}:{port}",
            "request": getattr(self, "requestline", "") or "-",
            "status": str(self.http_status or "-"),
            **self.log_fields,
        }
        if self.deadline.expired or self.timed_out:
            fields["note"] = "dropped: no complete request within the I/O timeout"
        elif self.note and self.http_status != 200:
            fields["note"] = self.note
        fields["duration"] = f"{time.monotonic() - self.started:.3f}s"
        LOG.info(format_fields(fields))


#: Connections the kernel queues before the server accepts them.
LISTEN_BACKLOG: Final = 128


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host``:``port`` (bound by root for a port below 1024).

    Raises OSError; the caller reports it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection and one client may hold (seconds, counts, bytes)."""

    handshake_timeout: float
    io_timeout: float
    max_connections: int
    per_client: int
    max_request_size: int


def client_key(host: str) -> str:
    """The address that connection limits count by: IPv4 as is, IPv6 by its /64.

    An IPv4 address mapped into IPv6 counts as the IPv4 address.
    """
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


class ConnectionCounter:
    """Open connections, in all and per client key; thread-safe."""

    def __init__(self, limit: int, per_client: int) -> None:
        self.limit = limit
        self.per_client = per_client
        self._total = 0
        self._by_client: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, key: str) -> str | None:
        """Count a new connection from ``key``; None, or why it is refused (not counted)."""
        with self._lock:
            held = self._by_client.get(key, 0)
            if held >= self.per_client:
                return f"{self.per_client} connections from {key} already open"
            if self._total >= self.limit:
                return f"{self.limit} connections already open"
            self._total += 1
            self._by_client[key] = held + 1
            return None

    def leave(self, key: str) -> None:
        """A connection counted by :meth:`enter` closed."""
        with self._lock:
            self._total -= 1
            left = self._by_client[key] - 1
            if left:
                self._by_client[key] = left
            else:
                del self._by_client[key]


class DropLog:
    """Logs refused connections at most once per ``interval`` per client key."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}  # key -> (logged at, not logged since)
        self._lock = threading.Lock()

    def dropped(self, key: str, client: str, reason: str) -> None:
        """Log (or count, to log later) one refused connection."""
        now = time.monotonic()
        with self._lock:
            logged_at, silent = self._last.get(key, (-self.interval, 0))
            if now - logged_at < self.interval:
                self._last[key] = (logged_at, silent + 1)
                return
            # Forget keys not heard from for a while, so the table stays small.
            for old in [k for k, (t, _) in self._last.items() if now - t >= self.interval]:
                del self._last[old]
            self._last[key] = (now, 0)
        note = f"dropped: {reason}"
        if silent:
            note += f" ({silent} more not logged)"
        LOG.warning(format_fields({"client": client, "note": note}))


class StapHTTPServer(ThreadingHTTPServer):
    """Accepts TLS connections and hands each to a thread, within :class:`ConnectionLimits`.

    It serves on a socket made by :func:`listen` beforehand, so that the server can
    bind a privileged port as root and serve after becoming the service user.
    """

    daemon_threads = True

    def __init__(
        self,
        sock: socket.socket,
        app: CompileApp,
        ssl_context: ssl.SSLContext,
        limits: ConnectionLimits,
    ) -> None:
        self.address_family = sock.family
        self.app = app
        self.ssl_context = ssl_context
        self.limits = limits
        self.connections = ConnectionCounter(limits.max_connections, limits.per_client)
        self._drops = DropLog(DROP_LOG_INTERVAL)
        address = sock.getsockname()
        super().__init__(address[:2], Handler, bind_and_activate=False)
        self.socket.close()  # the unbound one socketserver made: serve on ``sock``
        self.socket = sock
        self.server_address = address
        # What HTTPServer.server_bind would set, without its reverse DNS lookup.
        self.server_name = str(address[0])
        self.server_port = int(address[1])

    def get_request(self) -> tuple[Any, Any]:
        """Accept and wrap in TLS; the handshake itself happens in the worker thread."""
        sock, address = self.socket.accept()
        return self.ssl_context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a thread for the connection, or close it at once when over a limit."""
        key = client_key(str(client_address[0]))
        refusal = self.connections.enter(key)
        if refusal is not None:
            self._drops.dropped(key, f"{client_address[0]}:{client_address[1]}", refusal)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread (out of threads): the place is not taken
            self.connections.leave(key)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Run the connection, then free its place."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.leave(client_key(str(client_address[0])))

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection failed mid-way: one log line (a traceback only for a bug)."""
        exc = sys.exc_info()[1]
        fields = {"client": f"{client_address[0]}:{client_address[1]}"}
        if isinstance(exc, OSError):
            LOG.info(format_fields({**fields, "note": f"connection failed: {exc}"}))
        else:
            LOG.exception(format_fields({**fields, "note": "internal error"}))
