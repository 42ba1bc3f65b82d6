"""The local protocol between ``stap-client`` and ``stap-loader`` on a Unix socket.

Every message is a frame: a 4-byte big-endian length, that many bytes of a JSON
object (the header), then ``header["size"]`` raw bytes (0 if absent).

The client sends one ``load`` frame whose payload is the module followed by its
``.sgn`` file (if any)::

    {"type": "load", "module_name": "NAME.bo", "module_size": N, "signature_size": M|null}

The loader answers ``refused`` (and closes), or ``started`` followed by ``output``
frames (payload: bytes the module printed) and a final ``exit``.  The client asks
the loader to stop the module by shutting down its sending side (or by going away).

Everything in this module but the reading functions (which take a socket) is pure.
Every parser turns any input into a value or a one-line :class:`WireError`.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

from stapinit.core.errors import StapinitError
from stapinit.core.runtime import KIND_OF_SUFFIX
from stapinit.protocol import ProtocolError, check_module_name

#: Where stap-loader listens unless configured otherwise (the rendezvous of both sides).
DEFAULT_SOCKET: Final = Path("/run/stap-loader.sock")
#: Largest JSON header accepted; headers are small, anything bigger is an attack.
MAX_HEADER: Final = 64 * 1024
#: Largest output chunk in one frame.
MAX_OUTPUT_CHUNK: Final = 1024 * 1024
#: Largest ``.sgn`` file: a small JSON document (a manifest and one ECDSA signature).
MAX_SIGNATURE: Final = 64 * 1024
#: Bytes asked of the kernel per read: memory follows what has arrived, never
#: what a header announced.
_CHUNK: Final = 1 << 16

_LEN = struct.Struct(">I")
Stream = Literal["stdout", "stderr"]
#: A payload as built in memory or read from a socket.
Payload = bytes | bytearray


class WireError(StapinitError):
    """A frame breaks the protocol; ``str()`` is one line."""


@dataclass(frozen=True)
class Frame:
    """One message: its JSON header and its raw payload."""

    header: dict[str, Any]
    payload: Payload = b""

    @property
    def type(self) -> str:
        """The ``type`` field, or "" if it is missing or not a string."""
        value = self.header.get("type")
        return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class LoadRequest:
    """A module to load, as sent by the client."""

    module_name: str
    module: Payload
    signature: bytes | None = None


def frame_header(header: dict[str, Any], size: int = 0) -> bytes:
    """The bytes of a frame that come before its payload of ``size`` bytes."""
    head = dict(header)
    if size:
        head["size"] = size
    data = json.dumps(head, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_HEADER:
        raise WireError("frame header too large")
    return _LEN.pack(len(data)) + data


def encode_frame(header: dict[str, Any], payload: Payload = b"") -> bytes:
    """Serialise one frame; ``size`` is set from ``payload``."""
    return b"".join((frame_header(header, len(payload)), payload))


def parse_header(data: bytes) -> tuple[dict[str, Any], int]:
    """Parse a frame header; returns it and the payload size that follows.

    Any input either parses or raises :class:`WireError` (one line).
    """
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        # ValueError covers bad UTF-8, bad JSON and integers beyond Python's
        # digit limit; RecursionError, arrays nested thousands deep.
        raise WireError("frame header is not JSON within the protocol's limits") from None
    if not isinstance(obj, dict):
        raise WireError("frame header is not a JSON object")
    size = obj.get("size", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise WireError("frame size is not a non-negative integer")
    return cast(dict[str, Any], obj), size


def check_module_file_name(name: str) -> str:
    """Return ``name`` if it is ``<stap module name>.bo`` or ``.ko``, else raise WireError."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or f".{suffix}" not in KIND_OF_SUFFIX:
        raise WireError(f"module file {name[:80]!r} does not end in .bo or .ko")
    try:
        check_module_name(stem)
    except ProtocolError as exc:
        raise WireError(str(exc)) from None
    return name


def load_request_parts(req: LoadRequest) -> tuple[bytes, Payload, bytes]:
    """A load request as header, module and signature, to be sent one after another."""
    header = {
        "type": "load",
        "module_name": req.module_name,
        "module_size": len(req.module),
        "signature_size": None if req.signature is None else len(req.signature),
    }
    size = len(req.module) + len(req.signature or b"")
    return frame_header(header, size), req.module, req.signature or b""


_LOAD_KEYS = frozenset({"type", "module_name", "module_size", "signature_size", "size"})


@dataclass(frozen=True)
class LoadHeader:
    """A client's ``load`` frame header, checked: what its payload will hold."""

    module_name: str
    module_size: int
    signature_size: int | None


def _positive(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit


def parse_load_header(header: dict[str, Any], size: int, max_module: int) -> LoadHeader:
    """Validate a client's ``load`` header strictly, before its payload is read.

    Unknown fields are refused rather than ignored, so a crafted request cannot
    carry anything (a path, options) that a later version might act on. The
    module may have up to ``max_module`` bytes, its signature up to
    :data:`MAX_SIGNATURE`, and the two must make up the payload's ``size``.
    Raises :class:`WireError`.
    """
    if header.get("type") != "load":
        raise WireError("expected a load request")
    extra = set(header) - _LOAD_KEYS
    if extra:
        # repr(): a field name may hold anything, line breaks too, and ends up in a log.
        names = ", ".join(repr(name[:40]) for name in sorted(extra)[:5])
        raise WireError(f"unexpected fields in load request: {names}")
    name = header.get("module_name")
    if not isinstance(name, str):
        raise WireError("load request: module_name must be a string")
    check_module_file_name(name)
    module_size = header.get("module_size")
    sig_size = header.get("signature_size")
    if not _positive(module_size, max_module):
        raise WireError(f"load request: module_size must be a positive integer <= {max_module}")
    if sig_size is not None and not _positive(sig_size, MAX_SIGNATURE):
        raise WireError(
            f"load request: signature_size must be a positive integer <= {MAX_SIGNATURE} or null"
        )
    assert isinstance(module_size, int) and (sig_size is None or isinstance(sig_size, int))
    if module_size + (sig_size or 0) != size:
        raise WireError("load request: sizes do not add up to the payload")
    return LoadHeader(name, module_size, sig_size)


# --- loader -> client --------------------------------------------------------------


def refused(reason: str) -> bytes:
    """The loader will not load the module, and why (one line)."""
    return encode_frame({"type": "refused", "reason": " ".join(reason.split())})


def started(reason: str) -> bytes:
    """The module is being run."""
    return encode_frame({"type": "started", "reason": reason})


def output(stream: Stream, data: bytes) -> bytes:
    """Bytes the module printed on ``stream``."""
    return encode_frame({"type": "output", "stream": stream}, data)


def exited(status: int) -> bytes:
    """The module's runner exited with ``status``."""
    return encode_frame({"type": "exit", "status": status})


def exit_status(returncode: int) -> int:
    """A shell-style exit status from a ``subprocess`` return code: 128+N for signal N."""
    return 128 - returncode if returncode < 0 else returncode


# --- reading -----------------------------------------------------------------------

#: Where the bytes of a payload go as they arrive.
Sink = Callable[[bytes], object]


def _recv(sock: socket.socket, limit: int, deadline: float | None) -> bytes:
    """Up to ``limit`` bytes (b"" at EOF); the whole read must end by ``deadline``.

    With a ``deadline`` (a ``time.monotonic()`` value) TimeoutError is raised
    once it has passed, however the peer spaces its bytes.
    """
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
    return sock.recv(min(limit, _CHUNK))


def copy_payload(sock: socket.socket, size: int, deadline: float | None, sink: Sink) -> None:
    """Pass the next ``size`` bytes of ``sock`` to ``sink`` as they arrive.

    At most :data:`_CHUNK` bytes are held at a time, whatever ``size`` says.
    Raises WireError if the connection ends first, TimeoutError past ``deadline``.
    """
    left = size
    while left:
        data = _recv(sock, left, deadline)
        if not data:
            raise WireError("connection closed in the middle of a frame")
        sink(data)
        left -= len(data)


def _read_exactly(sock: socket.socket, size: int, deadline: float | None) -> bytes | None:
    """``size`` bytes, grown as they arrive; None on a clean EOF before the first."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        data = _recv(sock, size - got, deadline)
        if not data:
            if got == 0:
                return None
            raise WireError("connection closed in the middle of a frame")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def read_header(
    sock: socket.socket, deadline: float | None = None
) -> tuple[dict[str, Any], int] | None:
    """The next frame's header and the size of its payload; None on EOF between frames.

    Raises WireError for an oversized or malformed header, TimeoutError past
    ``deadline``; the payload is left unread.
    """
    raw_len = _read_exactly(sock, _LEN.size, deadline)
    if raw_len is None:
        return None
    (length,) = _LEN.unpack(raw_len)
    if length > MAX_HEADER:
        raise WireError("frame header too large")
    data = _read_exactly(sock, length, deadline) if length else b""
    if data is None:
        raise WireError("connection closed in the middle of a frame")
    return parse_header(data)


def read_frame(
    sock: socket.socket, max_payload: int, deadline: float | None = None
) -> Frame | None:
    """Read one frame from ``sock``; None on EOF between frames.

    Raises WireError for oversized or malformed frames before reading their
    payload, which is then gathered as it arrives (memory follows the bytes
    received, not the size announced). ``deadline`` (``time.monotonic()``)
    bounds the whole frame (TimeoutError), not each read.
    """
    head = read_header(sock, deadline)
    if head is None:
        return None
    header, size = head
    if size > max_payload:
        raise WireError(f"frame payload of {size} bytes exceeds the limit of {max_payload}")
    parts: list[bytes] = []
    copy_payload(sock, size, deadline, parts.append)
    return Frame(header, b"".join(parts))
