"""The local protocol between ``stap-client`` and ``stap-loader`` on a Unix socket.

Every message is a frame: a 4-byte big-endian length, that many bytes of a JSON
object (the header), then ``header["size"]`` raw bytes (0 if absent).

The client sends one ``load`` frame whose payload is the module followed by its
``.sgn`` file (if any)::

    {"type": "load", "module_name": "NAME.bo", "module_size": N, "signature_size": M|null}

The loader answers ``refused`` (and closes), or ``started`` followed by ``output``
frames (payload: bytes the module printed) and a final ``exit``.  The client asks
the loader to stop the module by shutting down its sending side (or by going away).

Everything in this module but :func:`read_frame` is pure.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

from stapinit.core.runtime import KIND_OF_SUFFIX
from stapinit.protocol import ProtocolError, check_module_name

#: Largest JSON header accepted; headers are small, anything bigger is an attack.
MAX_HEADER: Final = 64 * 1024
#: Largest output chunk in one frame.
MAX_OUTPUT_CHUNK: Final = 1024 * 1024

_LEN = struct.Struct(">I")
Stream = Literal["stdout", "stderr"]
#: A payload as read from a socket (a preallocated buffer) or built in memory.
Payload = bytes | bytearray


class WireError(Exception):
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
    """Parse a frame header; returns it and the payload size that follows."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireError("frame header is not JSON") from None
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
        raise WireError(f"module file {name!r} does not end in .bo or .ko")
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


def encode_load_request(req: LoadRequest) -> bytes:
    """Serialise a load request."""
    return b"".join(load_request_parts(req))


_LOAD_KEYS = frozenset({"type", "module_name", "module_size", "signature_size", "size"})


def parse_load_request(frame: Frame) -> LoadRequest:
    """Validate a client's ``load`` frame strictly; raises WireError.

    Unknown fields are refused rather than ignored, so a crafted request cannot
    carry anything (a path, options) that a later version might act on.  A
    ``bytearray`` payload (as :func:`read_frame` returns) becomes the module
    itself, its signature cut off the end, so a large module is never copied.
    """
    header = frame.header
    if frame.type != "load":
        raise WireError("expected a load request")
    extra = set(header) - _LOAD_KEYS
    if extra:
        raise WireError(f"unexpected fields in load request: {', '.join(sorted(extra))}")
    name = header.get("module_name")
    if not isinstance(name, str):
        raise WireError("load request: module_name must be a string")
    check_module_file_name(name)
    module_size = header.get("module_size")
    sig_size = header.get("signature_size")
    if not isinstance(module_size, int) or isinstance(module_size, bool) or module_size <= 0:
        raise WireError("load request: module_size must be a positive integer")
    if sig_size is not None and (
        not isinstance(sig_size, int) or isinstance(sig_size, bool) or sig_size <= 0
    ):
        raise WireError("load request: signature_size must be a positive integer or null")
    if module_size + (sig_size or 0) != len(frame.payload):
        raise WireError("load request: sizes do not add up to the payload")
    payload = frame.payload
    signature = None if sig_size is None else bytes(payload[module_size:])
    if isinstance(payload, bytearray):
        del payload[module_size:]  # shrinks in place
        return LoadRequest(name, payload, signature)
    return LoadRequest(name, payload[:module_size], signature)


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


def _recv_into(sock: socket.socket, view: memoryview, deadline: float | None) -> int:
    """Fill ``view`` from ``sock``; the bytes read (short only at EOF).

    With a ``deadline`` (a ``time.monotonic()`` value) the whole read must end by
    then, however the peer spaces its bytes; TimeoutError otherwise.
    """
    got = 0
    while got < len(view):
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(remaining)
        count = sock.recv_into(view[got:], min(len(view) - got, 1 << 20))
        if not count:
            break
        got += count
    return got


def _recv_exactly(sock: socket.socket, count: int, deadline: float | None) -> bytearray | None:
    """``count`` bytes from ``sock`` in one buffer; None on a clean EOF before the first."""
    buffer = bytearray(count)
    got = _recv_into(sock, memoryview(buffer), deadline)
    if got == count:
        return buffer
    if got == 0:
        return None
    raise WireError("connection closed in the middle of a frame")


def read_frame(
    sock: socket.socket, max_payload: int, deadline: float | None = None
) -> Frame | None:
    """Read one frame from ``sock``; None on EOF between frames.

    Raises WireError for oversized or malformed frames before reading their
    payload, which is read into one buffer of the announced size.  ``deadline``
    (``time.monotonic()``) bounds the whole frame (TimeoutError), not each read.
    """
    raw_len = _recv_exactly(sock, _LEN.size, deadline)
    if raw_len is None:
        return None
    (length,) = _LEN.unpack(raw_len)
    if length > MAX_HEADER:
        raise WireError("frame header too large")
    data = _recv_exactly(sock, length, deadline) if length else bytearray()
    if data is None:
        raise WireError("connection closed in the middle of a frame")
    header, size = parse_header(bytes(data))
    if size > max_payload:
        raise WireError(f"frame payload of {size} bytes exceeds the limit of {max_payload}")
    payload = _recv_exactly(sock, size, deadline) if size else bytearray()
    if payload is None:
        raise WireError("connection closed in the middle of a frame")
    return Frame(header, payload)
