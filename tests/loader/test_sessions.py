"""A real stap-loader, real users, and stand-ins for stapbpf/staprun."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from stapinit import loader_wire as wire
from stapinit.protocol import MAX_MODULE_BYTES
from stapinit.trust.certs import generate_identity
from stapinit.trust.signing import sign_module
from stapinit.trust.stores import signer_store_at
from tests.loader.conftest import (
    Loader,
    RealModules,
    encode_load_request,
    start_loader,
    stop_loader,
)
from tests.trust.people import VENV_BIN, User, run_as, shared_tmpdir
from tests.trust.signers import make_signer


def load(name: str, module: bytes, signature: bytes | None = None) -> bytes:
    return encode_load_request(wire.LoadRequest(name, module, signature))


def signed(
    loader: Loader,
    module: bytes,
    name: str = "hello.bo",
    privilege: str = "stapusr",
    trust: bool = True,
) -> bytes:
    """A signature for ``module`` by a fresh signer, trusted by the loader if ``trust``."""
    key, cert = generate_identity(loader.base / "k", loader.base / "c", "signer.example")
    if trust:
        signer_store_at(loader.signer_store).add(cert)
    uname = os.uname()
    return sign_module(
        key, cert, module, name, uname.release, uname.machine, privilege, source="ab" * 32
    )


def outputs(frames: list[wire.Frame], stream: str = "stdout") -> str:
    return "".join(
        f.payload.decode() for f in frames if f.type == "output" and f.header["stream"] == stream
    )


def only_refusal(frames: list[wire.Frame]) -> str:
    assert [f.type for f in frames] == ["refused"]
    reason = frames[0].header["reason"]
    assert isinstance(reason, str)
    return reason


def test_stapdev_runs_an_unsigned_module_from_a_private_copy(
    loader: Loader, users: dict[str, User]
) -> None:
    frames = loader.request(users["sttest_dev"], load("hello.bo", b"hello module"))
    assert frames[0].type == "started"
    assert frames[-1].header == {"type": "exit", "status": 3}
    out = outputs(frames)
    assert "ran hello.bo: hello module" in out
    assert outputs(frames, "stderr") == "on stderr\n"
    argv = out.splitlines()[0].split()
    module_path = Path(argv[2])
    assert module_path.name == "hello.bo"
    assert module_path.parent.name.startswith("stap-loader-")
    assert not module_path.exists()  # the private copy is cleaned up
    assert "sttest_dev (uid" in loader.log.read_text()


def test_ordinary_user_is_refused(loader: Loader, users: dict[str, User]) -> None:
    module = b"hello module"
    reason = only_refusal(loader.request(users["sttest_plain"], load("hello.bo", module)))
    assert "user 'sttest_plain' is not root nor a member of stapdev" in reason
    # Even a module signed by a trusted signer (spec §6.1.3).
    sig = signed(loader, module)
    reason = only_refusal(loader.request(users["sttest_plain"], load("hello.bo", module, sig)))
    assert "may not load modules" in reason


def test_stapusr_needs_a_trusted_signature(loader: Loader, users: dict[str, User]) -> None:
    usr = users["sttest_usr"]
    module = b"hello module"
    reason = only_refusal(loader.request(usr, load("hello.ko", module)))
    assert "does not have authority to load the unsigned module hello.ko" in reason

    untrusted = signed(loader, module, name="hello.ko", trust=False)
    reason = only_refusal(loader.request(usr, load("hello.ko", module, untrusted)))
    assert "the server is not a trusted signer" in reason

    good = signed(loader, module, name="hello.ko")
    frames = loader.request(usr, load("hello.ko", module, good))
    assert "ran hello.ko: hello module" in outputs(frames)

    flipped = bytes([module[0] ^ 1]) + module[1:]
    reason = only_refusal(loader.request(usr, load("hello.ko", flipped, good)))
    assert "has been altered since it was signed" in reason

    doc = json.loads(good)
    doc["manifest"]["privilege"] = "stapdev"
    raised = json.dumps(doc).encode()
    reason = only_refusal(loader.request(usr, load("hello.ko", module, raised)))
    assert "has been altered since it was signed" in reason

    # Validly signed, but for stapdev: beyond a stapusr member.
    for_dev = signed(loader, module, name="hello.ko", privilege="stapdev")
    reason = only_refusal(loader.request(usr, load("hello.ko", module, for_dev)))
    assert "signed for privilege 'stapdev'" in reason

    # A signature for another module name cannot be reused under this one.
    reason = only_refusal(loader.request(usr, load("other.ko", module, good)))
    assert "was signed as 'hello.ko'" in reason


def test_signer_store_writable_by_others_is_not_trusted(
    loader: Loader, users: dict[str, User]
) -> None:
    module = b"hello module"
    sig = signed(loader, module)
    loader.signer_store.chmod(0o777)
    reason = only_refusal(loader.request(users["sttest_usr"], load("hello.bo", module, sig)))
    assert "the server is not a trusted signer" in reason
    assert "writable by group or others" in reason


@pytest.mark.parametrize(
    "request_bytes",
    [
        load("hello.bo", b"x").replace(b'"hello.bo"', b'"/etc/shadow"'),
        wire.encode_frame(
            {
                "type": "load",
                "module_name": "../../../etc/shadow.bo",
                "module_size": 1,
                "signature_size": None,
            },
            b"x",
        ),
        wire.encode_frame(
            {
                "type": "load",
                "module_name": "hello.bo",
                "module_size": 1,
                "signature_size": None,
                "path": "/bin/sh",
            },
            b"x",
        ),
        wire.encode_frame(
            {
                "type": "load",
                "module_name": "hello.bo",
                "module_size": 1,
                "signature_size": None,
                "runner": "/bin/sh",
            },
            b"x",
        ),
        wire.encode_frame({"type": "run", "argv": ["/bin/sh", "-c", "id"]}),
        b"\xff\xff\xff\xff",
    ],
)
def test_crafted_requests_run_nothing(
    loader: Loader, users: dict[str, User], request_bytes: bytes
) -> None:
    for name in ("sttest_usr", "sttest_dev"):
        reason = only_refusal(loader.request(users[name], request_bytes))
        assert reason.startswith("bad request: ")
    assert "argv:" not in loader.log.read_text()


def test_stapusr_cannot_name_an_arbitrary_file(loader: Loader, users: dict[str, User]) -> None:
    # The module travels as bytes; whatever file the caller names, only those bytes run.
    victim = loader.base / "victim.bo"
    victim.write_bytes(b"tick")
    module = str(victim).encode()
    sig = signed(loader, module, name="hello.ko")
    frames = loader.request(users["sttest_usr"], load("hello.ko", module, sig))
    assert f"ran hello.ko: {victim}" in outputs(frames)
    assert "tick" not in outputs(frames)


def test_client_going_away_stops_the_module(loader: Loader, users: dict[str, User]) -> None:
    frames = loader.request(users["sttest_dev"], load("ticker.bo", b"tick"), mode="close")
    assert frames[-1].type == "output"
    deadline = time.monotonic() + 5
    while not loader.marker.exists():
        assert time.monotonic() < deadline, "the module was not stopped"
        time.sleep(0.05)


def test_half_close_stops_cleanly_and_reports_the_end(
    loader: Loader, users: dict[str, User]
) -> None:
    frames = loader.request(users["sttest_dev"], load("ticker.bo", b"tick"), mode="halfclose")
    assert "stopping cleanly" in outputs(frames)
    assert frames[-1].header == {"type": "exit", "status": 0}
    assert loader.marker.exists()


def test_a_module_ignoring_sigterm_is_killed() -> None:
    base = shared_tmpdir("sttest-loader-")
    running = start_loader(base, stop_timeout=0.3)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(running.socket))
            sock.sendall(load("stubborn.bo", b"stubborn"))
            assert wire.read_frame(sock, 1 << 20) is not None  # started
            first = wire.read_frame(sock, 1 << 20)
            assert first is not None and first.type == "output"
            sock.shutdown(socket.SHUT_WR)
            started = time.monotonic()
            last = None
            while (frame := wire.read_frame(sock, 1 << 20)) is not None:
                last = frame
            assert last is not None
            assert last.header == {"type": "exit", "status": 128 + signal.SIGKILL}
            assert time.monotonic() - started < 3
    finally:
        stop_loader(running)
        shutil.rmtree(base)


def test_root_is_identified_by_the_kernel(loader: Loader) -> None:
    frames = loader.request(None, load("hello.bo", b"m"))
    assert frames[0].type == "started"
    assert "root (uid 0): hello.bo: loading" in loader.log.read_text()


def test_loader_refuses_to_run_as_non_root(users: dict[str, User]) -> None:
    result = run_as(
        users["sttest_dev"],
        [str(VENV_BIN / "stap-loader"), "--socket", "/tmp/x.sock"],
        {},
        Path("/"),
    )
    assert result.returncode == 4  # LSB: insufficient privilege
    assert result.stderr == "stap-loader: must run as root (loading modules needs it)\n"


def test_one_user_cannot_take_every_session(loader: Loader) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(4):  # the default per-user limit
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(sock)
            sock.connect(str(loader.socket))
            sock.sendall(load("ticker.bo", b"tick"))
            frame = wire.read_frame(sock, 1 << 20)
            assert frame is not None and frame.type == "started"
        frames = loader.request(None, load("hello.bo", b"m"))
        assert only_refusal(frames) == "you already run 4 modules"
    finally:
        for sock in held:
            sock.close()


def test_socket_activation(tmp_path: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    base = shared_tmpdir("sttest-loader-")
    started = start_loader(base)  # only for its stand-in tool and configuration
    stop_loader(started)
    sock_path = base / "activated.sock"
    with open(base / "activated.log", "wb") as log:
        proc = subprocess.Popen(
            [
                activate,
                "-l",
                str(sock_path),
                str(VENV_BIN / "stap-loader"),
                "--config",
                str(base / "stap-loader.conf"),
            ],
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            # The file appears at bind(), a moment before listen(): retry until it listens.
            assert time.monotonic() < deadline and proc.poll() is None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                time.sleep(0.02)
        with sock:
            sock.sendall(load("hello.bo", b"activated"))
            frames = []
            while (frame := wire.read_frame(sock, 1 << 20)) is not None:
                frames.append(frame)
        assert "ran hello.bo: activated" in outputs(frames)
        assert "listening on the socket from systemd" in (base / "activated.log").read_text()
        assert not (base / "loader.sock").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(base)


def test_stopping_the_loader_stops_its_modules(loader: Loader) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(loader.socket))
        sock.sendall(load("ticker.bo", b"tick"))
        for expected in ("started", "output"):  # the first output: its traps are set
            frame = wire.read_frame(sock, 1 << 20)
            assert frame is not None and frame.type == expected
        stop_loader(loader)
    assert loader.proc.returncode == 0
    assert loader.marker.exists()
    assert not loader.socket.exists()


def test_a_second_loader_does_not_steal_the_socket(loader: Loader) -> None:
    result = run_as(
        None,
        [str(VENV_BIN / "stap-loader"), "--config", str(loader.base / "stap-loader.conf")],
        {},
        loader.base,
    )
    assert result.returncode == 1
    assert result.stderr == f"stap-loader: another stap-loader is listening on {loader.socket}\n"
    frames = loader.request(None, load("hello.bo", b"still here"))
    assert "ran hello.bo: still here" in outputs(frames)


# --- a stapusr module is confined to its caller's processes ------------------------

IDS_STAND_IN = """#!/bin/sh
echo "ids $(id -ru) $(id -u) ${SYSTEMTAP_REAL_UID-unset} ${SYSTEMTAP_REAL_GID-unset}"
"""


def test_staprun_is_told_whose_module_it_loads(users: dict[str, User]) -> None:
    # SystemTap's runtime confines a stapusr module to the processes of the uid that
    # loaded it; staprun run by root takes that uid from SYSTEMTAP_REAL_UID/GID.
    base = shared_tmpdir("sttest-loader-")
    staprun = base / "staprun"
    staprun.write_text(IDS_STAND_IN)
    staprun.chmod(0o755)
    running = start_loader(base, staprun=staprun)
    try:
        usr = users["sttest_usr"]
        sig = signed(running, b"kmod", name="confined.ko")
        frames = running.request(usr, load("confined.ko", b"kmod", sig))
        assert outputs(frames) == f"ids 0 0 {usr.uid} {usr.gid}\n"
        for who in (users["sttest_dev"], None):  # stapdev and root: not confined
            frames = running.request(who, load("free.ko", b"kmod"))
            assert outputs(frames) == "ids 0 0 unset unset\n"
        # stapbpf has no such setting; it is not given one.
        frames = running.request(users["sttest_usr"], load("free.ko", b"kmod"))
        assert "unsigned module" in only_refusal(frames)
    finally:
        stop_loader(running)
        shutil.rmtree(base)


def test_real_staprun_loads_a_stapusr_module_as_the_caller(users: dict[str, User]) -> None:
    strace, staprun = shutil.which("strace"), shutil.which("staprun")
    if strace is None or staprun is None:
        pytest.skip("needs strace and SystemTap's staprun")
    base = shared_tmpdir("sttest-loader-")
    trace = base / "trace"
    wrapper = base / "traced-staprun"
    wrapper.write_text(
        f"#!/bin/sh\nexec {strace} -f -qq -o {trace} "
        f'-e trace=setreuid,setregid,init_module,finit_module {staprun} "$@"\n'
    )
    wrapper.chmod(0o755)
    running = start_loader(base, staprun=wrapper)
    try:
        usr = users["sttest_usr"]
        module = b"not really a kernel module"
        sig = signed(running, module, name="confined.ko")
        frames = running.request(usr, load("confined.ko", module, sig))
        assert frames[0].type == "started"
        calls = trace.read_text()
        # staprun takes the caller's uid and gid before it inserts the module, so the
        # module's runtime records the caller, not root.
        uid_set = re.search(rf"setreuid\({usr.uid}, -1\)\s+= 0", calls)
        gid_set = re.search(rf"setregid\({usr.gid}, -1\)\s+= 0", calls)
        inserted = re.search(r"\binit_module\(|finit_module\(", calls)
        assert uid_set and gid_set and inserted, calls
        assert max(uid_set.start(), gid_set.start()) < inserted.start()

        frames = running.request(users["sttest_dev"], load("free.ko", module))
        assert frames[0].type == "started"
        assert "setreuid" not in trace.read_text()
    finally:
        stop_loader(running)
        shutil.rmtree(base)


def test_a_bpf_module_probing_user_space_is_only_for_stapdev(
    loader: Loader, users: dict[str, User], real_modules: RealModules
) -> None:
    usr, dev = users["sttest_usr"], users["sttest_dev"]
    hello_sig = signed(loader, real_modules.hello, name="hello_mod.bo")
    frames = loader.request(usr, load("hello_mod.bo", real_modules.hello, hello_sig))
    assert frames[0].type == "started"

    # Signed by a trusted signer for stapusr, and still refused: stapbpf would let
    # the probe see every user's processes.
    sig = signed(loader, real_modules.uprobe, name="uprobe_mod.bo")
    reason = only_refusal(loader.request(usr, load("uprobe_mod.bo", real_modules.uprobe, sig)))
    assert reason == (
        f"module uprobe_mod.bo probes user space (uprobe/p/0/"
        f"{reason.split('uprobe/p/0/')[1].split(')')[0]}): user-space probes are not "
        "allowed for unprivileged users under the BPF runtime"
    )
    assert str(real_modules.victim) in reason

    frames = loader.request(dev, load("uprobe_mod.bo", real_modules.uprobe, sig))
    assert frames[0].type == "started"


def test_a_signed_bpf_module_that_is_not_elf_is_refused(
    loader: Loader, users: dict[str, User]
) -> None:
    sig = signed(loader, b"#!/bin/sh\n", name="script.bo")
    reason = only_refusal(
        loader.request(users["sttest_usr"], load("script.bo", b"#!/bin/sh\n", sig))
    )
    assert reason == "module script.bo cannot be examined: not a BPF module: no ELF header"


def test_a_signer_whose_certificate_expired_is_not_believed(
    loader: Loader, users: dict[str, User]
) -> None:
    now = dt.datetime.now(dt.UTC)
    key, cert = make_signer(now - dt.timedelta(days=730), now - dt.timedelta(days=365))
    signer_store_at(loader.signer_store).add(cert)
    uname = os.uname()
    sig = sign_module(
        key, cert, b"kmod", "old.ko", uname.release, uname.machine, "stapusr",
        signed_at=now - dt.timedelta(days=500), source="ab" * 32,
    )  # fmt: skip
    reason = only_refusal(loader.request(users["sttest_usr"], load("old.ko", b"kmod", sig)))
    assert reason.startswith(
        "module old.ko could not be loaded: the signer's certificate has expired (valid "
    )


# --- local users cannot tie the loader up ------------------------------------------


def header_only(size: int) -> bytes:
    """The first bytes of a load request announcing ``size`` bytes that never come."""
    header = {"type": "load", "module_name": "big.bo", "module_size": size, "signature_size": None}
    return wire.frame_header(header, size)


def test_an_ordinary_user_is_refused_before_sending_anything(
    loader: Loader, users: dict[str, User]
) -> None:
    # The largest module announced and never sent: the refusal comes at once anyway ...
    started = time.monotonic()
    big = header_only(MAX_MODULE_BYTES)
    frames = loader.request(users["sttest_plain"], big, mode="wait=10")
    assert "is not root nor a member of stapdev" in only_refusal(frames)
    assert time.monotonic() - started < 5
    # ... while a stapusr member's same request is still awaited (its payload may come).
    frames = loader.request(users["sttest_usr"], big, mode="wait=1")
    assert [f.type for f in frames] == ["_timeout"]


def test_a_request_must_arrive_within_one_deadline() -> None:
    base = shared_tmpdir("sttest-loader-")
    running = start_loader(base, settings={"io_timeout": "1"})
    stop = threading.Event()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(running.socket))
            sock.settimeout(10)
            started = time.monotonic()
            sock.sendall(header_only(40))

            def drip() -> None:  # one byte every 0.2 s: each read is quick, the whole is not
                while not stop.wait(0.2):
                    try:
                        sock.send(b"x")
                    except OSError:
                        return

            dripper = threading.Thread(target=drip)
            dripper.start()
            try:
                frame = wire.read_frame(sock, 1 << 20)
                elapsed = time.monotonic() - started
            finally:
                stop.set()
                dripper.join()
        assert frame is not None
        assert frame.header == {
            "type": "refused",
            "reason": "bad request: not complete within 1 seconds",
        }
        assert 0.9 < elapsed < 3
        assert "request not complete within 1 s" in running.log.read_text()
    finally:
        stop_loader(running)
        shutil.rmtree(base)


def test_connections_beyond_the_limit_are_closed_at_once() -> None:
    base = shared_tmpdir("sttest-loader-")
    running = start_loader(base, settings={"max_sessions": "2", "io_timeout": "60"})
    held: list[socket.socket] = []
    try:
        for _ in range(2):  # two sessions that send nothing: every slot is taken
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(running.socket))
            held.append(sock)
        started = time.monotonic()
        for _ in range(20):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
                extra.settimeout(5)
                extra.connect(str(running.socket))
                frame = wire.read_frame(extra, 1 << 20)
                assert frame is not None
                assert frame.header == {
                    "type": "refused",
                    "reason": "stap-loader is busy; try again later",
                }
                assert extra.recv(1) == b""  # and closed, not queued
        assert time.monotonic() - started < 5
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5
        while True:  # the slots come back once their clients have gone
            frames = running.request(None, load("hello.bo", b"after"))
            if frames[0].type == "started":
                break
            assert time.monotonic() < deadline, frames
            time.sleep(0.1)
        assert "ran hello.bo: after" in outputs(frames)
    finally:
        for sock in held:
            sock.close()
        stop_loader(running)
        shutil.rmtree(base)
