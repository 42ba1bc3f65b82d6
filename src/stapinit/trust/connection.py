"""Talking to a stap-server over TLS, pinned to the certificates the user trusts.

Used by ``stap-client`` and by systemtap-service's ``COMPILE_SERVER``.

Server certificates are self-signed, so neither a CA nor the host name says
anything.  Instead the TLS handshake proves the server holds the key of the
certificate it shows, and that certificate's fingerprint must be in a trust
store.  The check happens right after the handshake, before a byte of the
request is sent.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Collection
from typing import Final

from cryptography import x509

from stapinit.protocol import (
    COMPILE_PATH,
    CONTENT_TYPE,
    MAX_MODULE_BYTES,
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
#: Largest response read: the largest module in base64, and room for stap's messages
#: (the server keeps 1 MB of each stream, which JSON escaping may grow sixfold).
MAX_RESPONSE: Final = (MAX_MODULE_BYTES + 2) // 3 * 4 + 16 * 1024 * 1024


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


def connect_pinned(
    address: ServerAddress, trusted: Collection[str], timeout: float = COMPILE_TIMEOUT
) -> http.client.HTTPSConnection:
    """An HTTPS connection to ``address`` whose certificate is one of ``trusted``.

    ``timeout`` bounds, in seconds, each wait for the server once connected.
    Raises ServerUntrustedError (nothing has been sent) or ServerError.
    """
    conn = http.client.HTTPSConnection(
        address.host, address.port, context=_tls_context(), timeout=CONNECT_TIMEOUT
    )
    try:
        conn.connect()
    except (OSError, ssl.SSLError) as exc:
        conn.close()
        raise ServerError(f"cannot connect to server {address}: {_why(exc)}") from None
    sock = conn.sock
    der = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
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
    sock.settimeout(timeout)
    return conn


def compile_remote(
    conn: http.client.HTTPSConnection, address: ServerAddress, req: CompileRequest
) -> CompileResponse:
    """Send ``req`` on a pinned connection and return the server's answer."""
    try:
        body = encode_compile_request(req)
    except ProtocolError as exc:
        raise ServerError(str(exc)) from None
    try:
        conn.request("POST", COMPILE_PATH, body=body, headers={"Content-Type": CONTENT_TYPE})
        response = conn.getresponse()
        data = response.read(MAX_RESPONSE + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise ServerError(f"server {address} failed: {_why(exc)}") from None
    finally:
        conn.close()
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


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__
