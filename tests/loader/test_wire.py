"""The client/loader framing and the strict checks on a load request."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stapinit import loader_wire as wire
from stapinit.protocol import MAX_MODULE_BYTES
from tests.loader.conftest import encode_load_request, parse_load_request


def frame_of(data: bytes) -> wire.Frame:
    """Read one frame back from its bytes through a real socket pair."""
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        frame = wire.read_frame(right, MAX_MODULE_BYTES)
    assert frame is not None
    return frame


def raw_frame(header: dict[str, object], payload: bytes = b"") -> bytes:
    data = json.dumps(header).encode()
    return struct.pack(">I", len(data)) + data + payload


@given(
    name=st.from_regex(r"[a-z0-9_]{1,55}\.(bo|ko)", fullmatch=True),
    module=st.binary(min_size=1, max_size=2000),
    signature=st.none() | st.binary(min_size=1, max_size=200),
)
def test_load_request_round_trips(name: str, module: bytes, signature: bytes | None) -> None:
    req = wire.LoadRequest(name, module, signature)
    assert parse_load_request(frame_of(encode_load_request(req))) == req


@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd",
        "../../bin/sh.bo",
        "dir/hello.bo",
        "hello",
        "hello.so",
        "Hello.bo",
        "-v.bo",
        ".bo",
        "a" * 56 + ".bo",
        "hello.bo\0",
    ],
)
def test_module_names_that_could_be_paths_or_options_are_refused(name: str) -> None:
    frame = wire.Frame(
        {"type": "load", "module_name": name, "module_size": 1, "signature_size": None}, b"x"
    )
    with pytest.raises(wire.WireError):
        parse_load_request(frame)


@pytest.mark.parametrize(
    ("header", "payload", "match"),
    [
        ({"type": "run"}, b"", "expected a load request"),
        (
            {
                "type": "load",
                "module_name": "a.bo",
                "module_size": 1,
                "signature_size": None,
                "path": "/bin/sh",
            },
            b"x",
            "unexpected fields in load request: 'path'",
        ),
        (
            {
                "type": "load",
                "module_name": "a.bo",
                "module_size": 1,
                "signature_size": None,
                "options": ["-c", "id"],
            },
            b"x",
            "unexpected fields",
        ),
        (
            {"type": "load", "module_name": "a.bo", "module_size": 2, "signature_size": None},
            b"x",
            "do not add up",
        ),
        (
            {"type": "load", "module_name": "a.bo", "module_size": 1, "signature_size": 5},
            b"xy",
            "do not add up",
        ),
        (
            {"type": "load", "module_name": "a.bo", "module_size": 0, "signature_size": None},
            b"",
            "positive",
        ),
        (
            {"type": "load", "module_name": "a.bo", "module_size": True, "signature_size": None},
            b"x",
            "positive",
        ),
        (
            {"type": "load", "module_name": "a.bo", "module_size": 1, "signature_size": -1},
            b"x",
            "signature_size",
        ),
        (
            {"type": "load", "module_name": 7, "module_size": 1, "signature_size": None},
            b"x",
            "module_name must be a string",
        ),
    ],
)
def test_crafted_requests_are_refused(
    header: dict[str, object], payload: bytes, match: str
) -> None:
    with pytest.raises(wire.WireError, match=match):
        parse_load_request(wire.Frame(header, payload))


def test_signature_is_split_from_module() -> None:
    header = {"type": "load", "module_name": "a.bo", "module_size": 3, "signature_size": 2}
    req = parse_load_request(frame_of(raw_frame({**header, "size": 5}, b"modsg")))
    assert (req.module, req.signature) == (b"mod", b"sg")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (struct.pack(">I", wire.MAX_HEADER + 1), "header too large"),
        (raw_frame({"size": MAX_MODULE_BYTES + 1}), "exceeds the limit"),
        (raw_frame({"size": -1}), "non-negative"),
        (struct.pack(">I", 4) + b"[1] ", "not a JSON object"),
        (struct.pack(">I", 3) + b"{{{", "not JSON"),
        (raw_frame({"size": 10}, b"short"), "closed in the middle"),
        (struct.pack(">I", 50) + b"{}", "closed in the middle"),
    ],
)
def test_malformed_frames_are_refused_before_their_payload(data: bytes, match: str) -> None:
    with pytest.raises(wire.WireError, match=match):
        frame_of(data)


def test_eof_between_frames_is_none() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.close()
        assert wire.read_frame(right, 10) is None


def test_loader_messages() -> None:
    assert frame_of(wire.refused("no\nway")).header == {"type": "refused", "reason": "no way"}
    out = frame_of(wire.output("stderr", b"bytes\x00\xff"))
    assert (out.type, out.header["stream"], out.payload) == ("output", "stderr", b"bytes\x00\xff")
    assert frame_of(wire.exited(3)).header == {"type": "exit", "status": 3}


def test_memory_follows_the_bytes_received_not_the_size_announced() -> None:
    # A header announcing the largest module, then one byte and EOF.
    header = {"type": "load", "module_name": "big.bo", "module_size": MAX_MODULE_BYTES}
    data = raw_frame({**header, "signature_size": None, "size": MAX_MODULE_BYTES}, b"x")
    tracemalloc.start()
    try:
        with pytest.raises(wire.WireError, match="closed in the middle"):
            frame_of(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
LOAD_KEYS = st.sampled_from(["type", "module_name", "module_size", "signature_size", "size"])
FUZZ = settings(max_examples=200, deadline=None)


@FUZZ
@given(st.binary(max_size=300))
def test_any_header_bytes_parse_or_are_refused_in_one_line(data: bytes) -> None:
    try:
        header, size = wire.parse_header(data)
    except wire.WireError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(header, dict) and size >= 0


SCALAR = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=60)
    | st.sampled_from(["load", "hello.bo", "hello.ko", "../x.bo"])
)  # fmt: skip


@FUZZ
@given(
    st.dictionaries(LOAD_KEYS | st.text(max_size=8), SCALAR | st.lists(SCALAR, max_size=2)),
    st.integers(),
)
def test_any_load_header_is_accepted_only_whole_and_sound(
    header: dict[str, object], size: int
) -> None:
    try:
        load = wire.parse_load_header(header, size, MAX_MODULE_BYTES)
    except wire.WireError as exc:
        assert "\n" not in str(exc)
    else:
        assert 0 < load.module_size <= MAX_MODULE_BYTES
        assert load.signature_size is None or 0 < load.signature_size <= wire.MAX_SIGNATURE
        assert load.module_size + (load.signature_size or 0) == size


@FUZZ
@given(st.binary(max_size=200))
def test_any_byte_stream_reads_as_frames_or_a_one_line_refusal(data: bytes) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        try:
            while wire.read_frame(right, 1 << 16, deadline=time.monotonic() + 5) is not None:
                pass
        except wire.WireError as exc:
            assert "\n" not in str(exc)


@FUZZ
@given(JSON, st.binary(max_size=50))
def test_any_json_header_on_the_wire_reads_or_is_refused(value: object, tail: bytes) -> None:
    data = json.dumps(value).encode()
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack(">I", len(data)) + data + tail)
        left.shutdown(socket.SHUT_WR)
        try:
            wire.read_frame(right, 1 << 16, deadline=time.monotonic() + 5)
        except wire.WireError as exc:
            assert "\n" not in str(exc)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b'{"type": "load", "size": ' + b"9" * 5000 + b"}", "not JSON within"),
        (b'{"type": "load", "module_size": ' + b"1" * 4301 + b"}", "not JSON within"),
        (b"[" * 20000 + b"]" * 20000, "not JSON within"),
        (b'{"size": 1e999999}', "non-negative integer"),
        (b'{"size": NaN}', "non-negative integer"),
        (b"\xff{}", "not JSON within"),
        (b'{"a": "\\ud800"}', None),  # a lone surrogate is JSON; the checks come later
    ],
)
def test_hostile_json_is_refused_not_raised(data: bytes, match: str | None) -> None:
    if match is None:
        assert wire.parse_header(data)[1] == 0
        return
    with pytest.raises(wire.WireError, match=match):
        wire.parse_header(data)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"signature_size": wire.MAX_SIGNATURE + 1}, "signature_size must be a positive integer"),
        ({"module_size": MAX_MODULE_BYTES + 1}, "module_size must be a positive integer"),
        ({"module_size": 1.0}, "module_size must be a positive integer"),
    ],
)
def test_sizes_beyond_the_limits_are_refused_before_any_payload(
    changes: dict[str, object], match: str
) -> None:
    header: dict[str, object] = {
        "type": "load", "module_name": "a.bo", "module_size": 1, "signature_size": None,
    }  # fmt: skip
    header.update(changes)
    with pytest.raises(wire.WireError, match=match):
        wire.parse_load_header(header, 1, MAX_MODULE_BYTES)


def test_one_deadline_bounds_the_whole_frame() -> None:
    # Each byte arrives well within any per-read timeout; the frame as a whole does not.
    left, right = socket.socketpair()
    stop = threading.Event()

    def drip() -> None:
        left.sendall(raw_frame({"size": 100}))
        while not stop.wait(0.05):
            try:
                left.send(b"x")
            except OSError:
                return

    dripper = threading.Thread(target=drip)
    dripper.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            wire.read_frame(right, 1000, deadline=started + 0.5)
    finally:
        stop.set()
        dripper.join()
        left.close()
        right.close()
    assert 0.45 < time.monotonic() - started < 2


def test_a_frame_within_its_deadline_is_read() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(wire.output("stdout", b"in time"))
        frame = wire.read_frame(right, 1000, deadline=time.monotonic() + 5)
    assert frame is not None and frame.payload == b"in time"
