from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stapinit import loader_wire as wire
from stapinit.protocol import MAX_MODULE_BYTES
from tests.support import shared_install
from tests.trust.bpfmodules import HELLO_SCRIPT, build_victim, compile_bo, process_probe_script
from tests.trust.people import SYSTEM_PATH, VENV_BIN, User, ensure_users, run_as, shared_tmpdir

#: A copy other users can read (the checkout may be private to its owner).
PROBE = shared_install.helper("probe_client.py")

#: A stand-in for stapbpf/staprun: what it does depends on the module's text.
STAND_IN = """#!/bin/sh
case "$(cat "$1")" in
  tick*) trap 'echo stopping cleanly; touch {marker}; exit 0' TERM ;;
  stubborn*) trap '' TERM ;;
esac
# Printed once the traps are set, so a client reacting to it cannot race them.
echo "argv: $0 $*"
case "$(cat "$1")" in
  tick*|stubborn*) while :; do echo tick; sleep 0.05; done ;;
  *) echo "ran $(basename "$1"): $(cat "$1")"; echo "on stderr" >&2; exit 3 ;;
esac
"""


def encode_load_request(req: wire.LoadRequest) -> bytes:
    """A whole load request, as stap-client sends it."""
    return b"".join(wire.load_request_parts(req))


def parse_load_request(frame: wire.Frame) -> wire.LoadRequest:
    """A whole ``load`` frame read back, checked as the loader checks its header."""
    head = wire.parse_load_header(frame.header, len(frame.payload), MAX_MODULE_BYTES)
    payload = bytes(frame.payload)
    signature = None if head.signature_size is None else payload[head.module_size :]
    return wire.LoadRequest(head.module_name, payload[: head.module_size], signature)


@dataclass(frozen=True)
class Loader:
    """A running stap-loader and the files around it."""

    base: Path
    socket: Path
    signer_store: Path
    marker: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def request(self, user: User | None, data: bytes, mode: str = "all") -> list[wire.Frame]:
        """Send ``data`` as ``user``; the frames the loader answered."""
        request_file = self.base / f"request-{time.monotonic_ns()}"
        request_file.write_bytes(data)
        request_file.chmod(0o644)
        result = run_as(
            user,
            [str(VENV_BIN / "python"), str(PROBE), str(self.socket), str(request_file), mode],
            {},
            self.base,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return [
            wire.Frame(f["header"], f["payload"].encode("latin-1"))
            for f in json.loads(result.stdout)
        ]


def popen_as(
    user: User | None, argv: list[str], env: dict[str, str], cwd: Path, stdin: int | None = None
) -> subprocess.Popen[str]:
    """Start ``argv`` as ``user`` (None: root) with exactly ``env``, its output piped (text)."""
    return subprocess.Popen(
        argv,
        env={"PATH": f"{VENV_BIN}:{SYSTEM_PATH}", **env},
        cwd=cwd,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        user=None if user is None else user.uid,
        group=None if user is None else user.gid,
        extra_groups=None if user is None else list(user.groups),
    )


@pytest.fixture(scope="session")
def users() -> dict[str, User]:
    """The real test users, by name."""
    return ensure_users()


def start_loader(
    base: Path,
    stop_timeout: float = 2.0,
    stapbpf: Path | None = None,
    signer_store: Path | None = None,
    staprun: Path | None = None,
    settings: dict[str, str] | None = None,
) -> Loader:
    """Start a real stap-loader (as root) on ``base/loader.sock``.

    Modules run with ``stapbpf`` and ``staprun`` if given, else with a stand-in;
    trusted signers come from ``signer_store`` (default: under ``base``);
    ``settings`` are further lines of the ``[loader]`` section.
    """
    marker = base / "stopped-cleanly"
    tool = base / "stand-in"
    tool.write_text(STAND_IN.format(marker=marker))
    tool.chmod(0o755)
    signers = signer_store or base / "etc/systemtap/staprun"
    config = base / "stap-loader.conf"
    config.write_text(
        f"[loader]\nsocket = {base / 'loader.sock'}\nstapbpf = {stapbpf or tool}\n"
        f"staprun = {staprun or tool}\nsigner_store = {signers}\nstop_timeout = {stop_timeout}\n"
        + "".join(f"{key} = {value}\n" for key, value in (settings or {}).items())
    )
    log = base / "loader.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [str(VENV_BIN / "stap-loader"), "--config", str(config)],
            stdout=log_file,
            stderr=log_file,
        )
    loader = Loader(base, base / "loader.sock", signers, marker, log, proc)
    deadline = time.monotonic() + 15
    while b"listening on" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"stap-loader did not start: {log.read_text()}")
        time.sleep(0.02)
    return loader


def stop_loader(loader: Loader) -> None:
    """SIGTERM the loader and wait for it."""
    loader.proc.send_signal(signal.SIGTERM)
    try:
        loader.proc.wait(10)
    except subprocess.TimeoutExpired:
        loader.proc.kill()
        loader.proc.wait()


@dataclass(frozen=True)
class RealModules:
    """Modules compiled by the real stap (BPF runtime) for stapusr."""

    victim: Path
    uprobe: bytes  # a process probe on the victim, and a begin probe
    hello: bytes  # a begin probe only


@pytest.fixture(scope="session")
def real_modules(tmp_path_factory: pytest.TempPathFactory) -> RealModules:
    """A victim program and two real ``.bo`` files (one probing the victim)."""
    base = tmp_path_factory.mktemp("loader-modules")
    victim = build_victim(base)
    return RealModules(
        victim,
        compile_bo(base, "uprobe_mod", process_probe_script(victim)),
        compile_bo(base, "hello_mod", HELLO_SCRIPT),
    )


@pytest.fixture
def loader() -> Iterator[Loader]:
    """A real stap-loader on a socket in a fresh directory."""
    base = shared_tmpdir("sttest-loader-")
    running = start_loader(base)
    yield running
    stop_loader(running)
    shutil.rmtree(base)
