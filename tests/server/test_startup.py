"""Start-up pieces: which releases are served, the foreground mode, the systemd unit."""

from __future__ import annotations

import dataclasses
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from stapinit.protocol import decode_compile_response
from stapinit.server.config import ServerConfig
from stapinit.server.errors import StapServerError
from stapinit.server.startup import check_sandbox_paths, installed_releases
from tests.server.conftest import ServerFactory
from tests.server.helpers import HELLO, HOST, STAP_SERVER, Server, bpf_request, ensure_service_user

UNIT = Path(__file__).resolve().parents[2] / "data" / "server" / "stap-server.service"


def test_installed_releases_need_a_build_tree(tmp_path: Path) -> None:
    for release, has_config in (("6.1.0-1", True), ("5.10.0-2", True), ("4.19.0-3", False)):
        build = tmp_path / release / "build"
        build.mkdir(parents=True)
        if has_config:
            (build / ".config").write_text("CONFIG_X=y\n")
    (tmp_path / "stray-file").write_text("")
    assert installed_releases(tmp_path) == ("5.10.0-2", "6.1.0-1")
    assert installed_releases(tmp_path / "missing") == ()


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def _serve_in_foreground(
    server: Server, prefix: Sequence[str] = (), **popen: Any
) -> subprocess.Popen[bytes]:
    """``stap-server run`` (after the ``prefix`` command), waited for until it answers."""
    proc = subprocess.Popen(
        [*prefix, str(STAP_SERVER), "-c", str(server.conf), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )
    deadline = time.monotonic() + 10
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            assert server.get("/").status == 200
            return proc
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.communicate()[1]


def test_foreground_run_as_root_becomes_the_service_user(server_factory: ServerFactory) -> None:
    """What the systemd unit does: ``run`` as root, stopped by SIGTERM."""
    user = ensure_service_user()
    server = server_factory()
    proc = _serve_in_foreground(server)
    try:
        assert server.pid() == proc.pid
        assert _uid_of(proc.pid) == user.pw_uid
        assert server.command("status").returncode == 0
    finally:
        err = _stop(proc)
    assert err == b""
    assert not server.pid_file.exists()
    assert server.key_path.stat().st_uid == 0
    assert "stopped" in server.log_text()


def test_started_without_root_warns_that_compiles_can_read_the_key(
    server_factory: ServerFactory,
) -> None:
    """Development: a server started by an ordinary user runs as that user."""
    user = ensure_service_user()
    server = server_factory()
    for directory in (server.state_dir, server.log_file.parent, server.pid_file.parent):
        directory.mkdir()
        os.chown(directory, user.pw_uid, user.pw_gid)
    proc = _serve_in_foreground(server, user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    try:
        assert server.key_path.stat().st_uid == user.pw_uid
    finally:
        err = _stop(proc).decode()
    assert err.count("\n") == 1, err
    assert err.startswith("stap-server: warning: not started as root")
    assert f"can read its private key {server.key_path}" in err
    assert "start the server as root in production" in err
    assert "not started as root" in server.log_text()


def _free_low_port() -> int:
    for port in random.sample(range(600, 1024), 100):
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def _unit_capabilities() -> list[str]:
    lines = [line for line in UNIT.read_text().splitlines() if not line.startswith("#")]
    [value] = [
        line.partition("=")[2] for line in lines if line.startswith("CapabilityBoundingSet=")
    ]
    return value.split()


def _unit_families() -> str:
    """The unit's RestrictAddressFamilies= as numbers, for ``restrict_af``."""
    lines = [line for line in UNIT.read_text().splitlines() if not line.startswith("#")]
    [value] = [
        line.partition("=")[2] for line in lines if line.startswith("RestrictAddressFamilies=")
    ]
    return ",".join(str(int(socket.AddressFamily[name])) for name in value.split())


@pytest.fixture(scope="module")
def restrict_af(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A program that runs a command under the unit's address-family restriction."""
    gcc = shutil.which("gcc")
    if gcc is None or platform.machine() != "x86_64":
        pytest.skip("needs gcc on x86-64")
    program = tmp_path_factory.mktemp("restrict-af") / "restrict_af"
    source = Path(__file__).with_name("restrict_af.c")
    subprocess.run([gcc, "-O2", "-o", str(program), str(source)], check=True, timeout=60)
    program.chmod(0o755)
    program.parent.chmod(0o755)
    return program


def test_start_as_root_with_only_the_unit_capabilities_on_a_low_port(
    server_factory: ServerFactory, restrict_af: Path
) -> None:
    """The unit's hardening still lets the server bind a port below 1024 and become USER.

    It compiles in its sandbox under the unit's RestrictAddressFamilies=.  The
    directories are as systemd and the install
    step leave them: the state
    directory root's (StateDirectory=, here with a cache turned over to root), the
    log directory the service user's (0750), the runtime directory root's.
    """
    user = ensure_service_user()
    server = server_factory()
    port = server.port = _free_low_port()
    server.write_config()
    server.state_dir.mkdir(mode=0o755)
    old_entry = server.state_dir / "cache" / "ab" / "old-entry"
    old_entry.mkdir(parents=True)
    server.log_file.parent.mkdir(mode=0o750)
    os.chown(server.log_file.parent, user.pw_uid, user.pw_gid)
    server.pid_file.parent.mkdir(mode=0o755)
    caps = ["-all", *(f"+{cap.lower().removeprefix('cap_')}" for cap in _unit_capabilities())]
    setpriv = ["setpriv", "--no-new-privs", "--bounding-set=" + ",".join(caps)]
    proc = _serve_in_foreground(server, [*setpriv, str(restrict_af), _unit_families()])
    try:
        assert _uid_of(proc.pid) == user.pw_uid
        # The compile sandbox works under the unit's restrictions.
        reply = server.compile(bpf_request(f"# {time.time_ns()}\n" + HELLO))
        assert reply.status == 200, reply.body
        assert decode_compile_response(reply.body).status == 0
        assert f"listening on {HOST}:{port}," in server.log_text()
        assert server.key_path.stat().st_uid == 0
        cache = (server.state_dir / "cache").stat()
        assert cache.st_uid == user.pw_uid
        # Discarded; the compile's own entry may land in a new cache/ab (1 key in 256).
        assert not old_entry.exists()
    finally:
        err = _stop(proc)
    assert err == b""


def test_systemd_unit_is_valid_and_starts_the_server_as_root(tmp_path: Path) -> None:
    text = UNIT.read_text()
    settings = [line.partition("=") for line in text.splitlines() if not line.startswith("#")]
    names = {name for name, eq, _ in settings if eq}
    # Root reads the key and binds; the server then becomes USER by itself.
    assert not names & {"User", "Group", "DynamicUser"}
    [caps] = [value.split() for name, _, value in settings if name == "CapabilityBoundingSet"]
    assert set(caps) == {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_NET_BIND_SERVICE"}
    assert "NoNewPrivileges=yes" in text
    # stap needs /usr/lib/modules, which ProtectKernelModules= hides; the sandbox
    # cannot mount its /proc under ProtectKernelTunables='s read-only /proc/sys.
    assert not names & {"ProtectKernelModules", "ProtectKernelTunables", "ProtectProc"}
    # The compile sandbox (bwrap --unshare-all) makes namespaces of these kinds.
    [kinds] = [value.split() for name, _, value in settings if name == "RestrictNamespaces"]
    assert {"user", "mnt", "pid", "ipc", "net", "uts"} <= set(kinds)
    assert " run\n" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "stap-server.service"
    # The paths "make install-server" fills in (tests/packaging checks the installed unit).
    for placeholder, path in (
        ("@BINDIR@/stap-server", str(STAP_SERVER)),
        ("@SYSCONFDIR@", "/etc"),
        ("@DOCDIR@", "/usr/share/doc/systemtap-compile-server"),
    ):
        text = text.replace(placeholder, path)
    unit.write_text(text)
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "stap-server.service" not in proc.stderr, proc.stderr


def test_sandbox_paths_must_not_show_the_servers_state_or_log(tmp_path: Path) -> None:
    state, logs = tmp_path / "var" / "state", tmp_path / "var" / "log"
    state.mkdir(parents=True)
    logs.mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "var")
    base = ServerConfig(state_dir=state, log_file=logs / "stap-server.log")
    check_sandbox_paths(dataclasses.replace(base, sandbox_paths=(tmp_path / "opt",)))
    for shown in (tmp_path / "var", state / "cache", logs, tmp_path / "link"):
        with pytest.raises(StapServerError, match="would show compiles") as err:
            check_sandbox_paths(dataclasses.replace(base, sandbox_paths=(shown,)))
        assert err.value.exit_code == 6
