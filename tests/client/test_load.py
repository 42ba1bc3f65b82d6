"""stap-client's side of the loader protocol, against a loader played by the test."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stapinit import loader_wire as wire
from stapinit.client.load import LoadError, run_via_loader
from tests.loader.conftest import parse_load_request

Behaviour = Callable[[socket.socket], None]


@pytest.fixture
def fake_loader(tmp_path: Path) -> Iterator[Callable[[Behaviour], Path]]:
    """Start a one-connection loader that does what the test says; its socket path."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(behaviour: Behaviour) -> Path:
        path = tmp_path / f"loader-{len(listeners)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listeners.append(listener)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                behaviour(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    for thread in threads:
        thread.join(10)
    for listener in listeners:
        listener.close()


def refuse_without_reading(conn: socket.socket) -> None:
    conn.sendall(wire.refused("user 'x' is not root nor a member of stapdev"))
    conn.shutdown(socket.SHUT_RDWR)


def test_a_refusal_sent_before_the_module_was_read_is_shown(
    fake_loader: Callable[[Behaviour], Path], tmp_path: Path
) -> None:
    # Far more than a socket buffer holds: the client's sending fails, and yet the
    # user sees why, not "Broken pipe".
    path = fake_loader(refuse_without_reading)
    started = time.monotonic()
    with pytest.raises(LoadError) as info:
        run_via_loader(path, "big.bo", b"\0" * (32 << 20), None, str(tmp_path / "out"))
    assert str(info.value) == "user 'x' is not root nor a member of stapdev"
    assert time.monotonic() - started < 5


def test_a_loader_vanishing_mid_request_is_reported_in_one_line(
    fake_loader: Callable[[Behaviour], Path], tmp_path: Path
) -> None:
    path = fake_loader(lambda conn: conn.shutdown(socket.SHUT_RDWR))
    with pytest.raises(LoadError) as info:
        run_via_loader(path, "big.bo", b"\0" * (32 << 20), None, str(tmp_path / "out"))
    assert str(info.value).startswith("lost the connection to stap-loader: ")
    assert "\n" not in str(info.value)


def test_output_and_status_come_through(
    fake_loader: Callable[[Behaviour], Path], tmp_path: Path
) -> None:
    def run(conn: socket.socket) -> None:
        frame = wire.read_frame(conn, 1 << 20)
        assert frame is not None
        req = parse_load_request(frame)
        conn.sendall(wire.started("ok"))
        conn.sendall(wire.output("stdout", b"got " + bytes(req.module)))
        conn.sendall(wire.exited(128 + 15))

    out = tmp_path / "out"
    assert run_via_loader(fake_loader(run), "m.bo", b"module", None, str(out)) == 143
    assert out.read_bytes() == b"got module"


def test_exit_status_is_shell_style() -> None:
    assert (wire.exit_status(0), wire.exit_status(3), wire.exit_status(-9)) == (0, 3, 137)


@pytest.mark.parametrize(
    "header",
    [
        b'{"type":"exit","status":' + b"9" * 5000 + b"}",
        b'{"type":"output","stream":"stdout","size":' + b"9" * 5000 + b"}",
        b"[" * 30000 + b"]" * 30000,
    ],
)
def test_a_hostile_loader_frame_is_one_line(
    fake_loader: Callable[[Behaviour], Path], tmp_path: Path, header: bytes
) -> None:
    def run(conn: socket.socket) -> None:
        assert wire.read_frame(conn, 1 << 20) is not None
        conn.sendall(wire.started("ok"))
        conn.sendall(len(header).to_bytes(4, "big") + header)

    with pytest.raises(LoadError) as info:
        run_via_loader(fake_loader(run), "m.bo", b"module", None, str(tmp_path / "out"))
    assert str(info.value) == (
        "lost the connection to stap-loader: frame header is not JSON within the protocol's limits"
    )


@pytest.mark.parametrize("status", [-1, 256, 1 << 40])
def test_an_exit_status_out_of_range_is_a_failure(
    fake_loader: Callable[[Behaviour], Path], tmp_path: Path, status: int
) -> None:
    def run(conn: socket.socket) -> None:
        assert wire.read_frame(conn, 1 << 20) is not None
        conn.sendall(wire.started("ok"))
        conn.sendall(wire.encode_frame({"type": "exit", "status": status}))

    assert run_via_loader(fake_loader(run), "m.bo", b"m", None, str(tmp_path / "out")) == 1
