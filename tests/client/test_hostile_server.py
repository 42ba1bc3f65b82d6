"""A trusted but hostile stap-server against stap-client: it may fail a compile, never
hold the client past its deadline, flood it, or choose what file the client writes."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stapinit.trust.address import ServerAddress
from stapinit.trust.connection import MAX_RESPONSE, ServerError, compile_on
from tests.server.helpers import bpf_request
from tests.support.hostile_server import HostileServer, hostile_server, send_json, trickle

BIN = Path(sys.executable).parent


def answer_module(name: str, data: bytes = b"#!/bin/sh\necho OWNED\n") -> bytes:
    return json.dumps(
        {
            "status": 0,
            "stdout": "",
            "stderr": "",
            "module": {"name": name, "data": base64.b64encode(data).decode()},
            "signature": None,
            "cached": False,
        }
    ).encode()


def failed_with_output(stdout: str) -> bytes:
    return json.dumps(
        {
            "status": 1,
            "stdout": stdout,
            "stderr": "x",
            "module": None,
            "signature": None,
            "cached": False,
        }
    ).encode()


def test_a_trickling_server_is_dropped_at_the_whole_request_deadline(tmp_path: Path) -> None:
    # One byte every 0.2 s: a per-read timeout of 1 s would never fire.
    with hostile_server(tmp_path, lambda tls, stop: trickle(tls, stop, 0.2)) as server:
        began = time.monotonic()
        with pytest.raises(ServerError) as info:
            compile_on(server.address, {server.fingerprint}, bpf_request(), timeout=1.5)
        took = time.monotonic() - began
    assert str(info.value) == f"server {server.address} did not answer within 1.5 s"
    assert 1.4 < took < 4
    assert server.requests == 1


def test_an_interrupt_ends_the_wait_for_a_server_at_once(tmp_path: Path) -> None:
    asked = threading.Event()
    threading.Timer(0.5, asked.set).start()
    with hostile_server(tmp_path, trickle) as server:
        began = time.monotonic()
        with pytest.raises(ServerError) as info:
            compile_on(server.address, {server.fingerprint}, bpf_request(), 600, asked.is_set)
        took = time.monotonic() - began
    assert str(info.value) == f"interrupted while waiting for server {server.address}"
    assert took < 2


def test_a_server_silent_in_the_tls_handshake_is_held_to_the_deadline(tmp_path: Path) -> None:
    # A TCP listener that never speaks TLS: the handshake is inside the deadline too.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = ServerAddress("127.0.0.1", silent.getsockname()[1])
        began = time.monotonic()
        with pytest.raises(ServerError, match="did not answer within 1 s"):
            compile_on(address, {"SHA256:" + "00" * 32}, bpf_request(), timeout=1)
        assert time.monotonic() - began < 3


def test_stap_output_over_the_bound_is_refused(tmp_path: Path) -> None:
    flood = failed_with_output("A" * (4 * 1024 * 1024))
    with (
        hostile_server(tmp_path, lambda tls, _stop: send_json(tls, flood)) as server,
        pytest.raises(ServerError, match="stap's output over"),
    ):
        compile_on(server.address, {server.fingerprint}, bpf_request(), timeout=30)


def test_an_announced_body_over_the_bound_is_refused_unread(tmp_path: Path) -> None:
    def claim(tls: ssl.SSLSocket, stop: threading.Event) -> None:
        send_json(tls, b"{", length=MAX_RESPONSE + 1)
        stop.wait(30)  # the rest never comes: the client must not wait for it

    with hostile_server(tmp_path, claim) as server:
        began = time.monotonic()
        with pytest.raises(ServerError, match=f"an answer over {MAX_RESPONSE} bytes"):
            compile_on(server.address, {server.fingerprint}, bpf_request(), timeout=30)
        assert time.monotonic() - began < 5


# --- stap-client -p4 writes only the module it asked for -------------------------------


def stap_client(
    server: HostileServer, trust_root: Path, cwd: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STAP_TRUST_ROOT": str(trust_root), "HOME": str(cwd)}
    return subprocess.run(
        [str(BIN / "stap-client"), f"--server={server.address}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def trust_root(tmp_path: Path) -> Path:
    root = tmp_path / "trust"
    root.mkdir()
    return root


def authorize(server: HostileServer, trust_root: Path) -> None:
    done = subprocess.run(
        [str(BIN / "stap-authorize-server-cert"), str(server.cert_path)],
        env={**os.environ, "STAP_TRUST_ROOT": str(trust_root)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("sent", "args"),
    [
        ("Makefile", ()),  # the red-team reproducer
        ("other.ko", ("-m", "wanted")),  # not the -m name asked for
        ("wanted.bo", ("-m", "wanted")),  # not the kmod runtime asked for
        ("Wanted.ko", ()),  # not a module name stap makes
    ],
)
def test_p4_refuses_a_module_name_it_did_not_ask_for(
    tmp_path: Path, trust_root: Path, sent: str, args: tuple[str, ...]
) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / sent).write_text("mine\n")
    with hostile_server(tmp_path, lambda tls, _s: send_json(tls, answer_module(sent))) as server:
        authorize(server, trust_root)
        done = stap_client(server, trust_root, cwd, "-p4", "--runtime=kmod", *args, "-e", "x")
    assert done.returncode != 0
    assert f"stap-client: the server sent a module named {sent!r}, not " in done.stderr
    assert (cwd / sent).read_text() == "mine\n"
    assert sorted(p.name for p in cwd.iterdir()) == [sent]


def test_p4_never_writes_through_or_over_a_symlink(tmp_path: Path, trust_root: Path) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    (cwd / "wanted.ko").symlink_to(victim)
    module = answer_module("wanted.ko")
    with hostile_server(tmp_path, lambda tls, _s: send_json(tls, module)) as server:
        authorize(server, trust_root)
        done = stap_client(server, trust_root, cwd, "-p4", "-m", "wanted", "-e", "x")
    assert done.returncode != 0
    assert "refusing to replace wanted.ko: it is not a regular file" in done.stderr
    assert victim.read_text() == "precious\n"
    assert (victim.stat().st_mode & 0o777) == 0o600
    assert os.readlink(cwd / "wanted.ko") == str(victim)


def test_p4_saves_the_module_it_asked_for(tmp_path: Path, trust_root: Path) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    module = answer_module("wanted.ko", b"\x7fELF module")
    with hostile_server(tmp_path, lambda tls, _s: send_json(tls, module)) as server:
        authorize(server, trust_root)
        done = stap_client(server, trust_root, cwd, "-p4", "-m", "wanted", "-e", "x")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "wanted.ko\n"
    assert (cwd / "wanted.ko").read_bytes() == b"\x7fELF module"
