"""Spec §6.2.1 as written, on one host: no server configured, the local one is used.

The server listens on its default port (9740), so the test runs it in a
network namespace of its own (``unshare --net``), where that port is free
whatever else this machine runs; the client runs in the same namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from stapinit.protocol import DEFAULT_PORT
from tests.client.conftest import HELLO
from tests.server.helpers import STAP_SERVER, Server, ensure_service_user, make_server
from tests.trust.people import SYSTEM_PATH, VENV_BIN, shared_tmpdir


class Namespace:
    """A private network namespace with loopback up, held open by a sleeping process."""

    def __init__(self) -> None:
        if shutil.which("unshare") is None or shutil.which("nsenter") is None:
            pytest.skip("needs util-linux's unshare and nsenter")
        self.holder = subprocess.Popen(["unshare", "--net", "sleep", "300"])
        # unshare(1) makes the namespace, then runs sleep: wait until it has.
        ours = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 5
        while self._netns() in (ours, None):
            assert time.monotonic() < deadline, "unshare did not make a namespace"
            time.sleep(0.01)
        self.run(["ip", "link", "set", "lo", "up"], {}).check_returncode()

    def _netns(self) -> str | None:
        try:
            return os.readlink(f"/proc/{self.holder.pid}/ns/net")
        except OSError:
            return None

    def run(
        self, argv: Sequence[str], env: dict[str, str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", *argv],
            env={"PATH": f"{VENV_BIN}:{SYSTEM_PATH}", "LANG": "C.UTF-8", **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def netns() -> Iterator[Namespace]:
    namespace = Namespace()
    yield namespace
    namespace.close()


@pytest.fixture
def host(stapbpf_wrapper: Path) -> Iterator[Path]:
    """A client host's /etc/systemtap with no server listed (the installed client.conf)."""
    base = shared_tmpdir("sttest-onehost-")
    sysconf = base / "root/etc/systemtap"
    sysconf.mkdir(parents=True)
    for directory in (base / "root", base / "root/etc", sysconf):
        directory.chmod(0o755)
    installed = Path(__file__).parents[2] / "data/client/client.conf"
    (sysconf / "client.conf").write_text(
        installed.read_text()
        + f"runtime = bpf\nstapbpf = {stapbpf_wrapper}\n"  # this host runs BPF alone
    )
    yield base
    shutil.rmtree(base, ignore_errors=True)


def client_env(base: Path) -> dict[str, str]:
    return {"STAP_TRUST_ROOT": str(base / "root"), "HOME": str(base)}


def start_local_server(netns: Namespace, base: Path) -> Server:
    ensure_service_user()
    server = make_server(base, "server")
    server.port = DEFAULT_PORT
    server.write_config()
    started = netns.run([str(STAP_SERVER), "-c", str(server.conf), "start"], {})
    assert started.returncode == 0, started.stderr
    probe = f"import socket; socket.create_connection(('127.0.0.1', {DEFAULT_PORT}), 1).close()"
    deadline = time.monotonic() + 15
    while netns.run([str(VENV_BIN / "python"), "-c", probe], {}).returncode != 0:
        assert time.monotonic() < deadline, "stap-server did not start"
        time.sleep(0.05)
    return server


def test_6_2_1_hello_on_the_host_running_the_server(netns: Namespace, host: Path) -> None:
    server = start_local_server(netns, host)
    try:
        authorized = netns.run(
            ["stap-authorize-server-cert", str(server.cert_path)], client_env(host)
        )
        assert authorized.returncode == 0, authorized.stderr
        result = netns.run(["stap-client", "-e", HELLO], client_env(host))
        assert (result.returncode, result.stdout) == (0, "Hello\n"), result.stderr
    finally:
        netns.run([str(STAP_SERVER), "-c", str(server.conf), "stop"], {})


def test_without_any_server_the_user_is_told_what_to_do(netns: Namespace, host: Path) -> None:
    result = netns.run(["stap-client", "-e", HELLO], client_env(host))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"stap-client: cannot connect to server localhost:{DEFAULT_PORT}: Connection refused; "
        "no other server is known: give --server=HOST[:PORT] or list servers in client.conf\n"
    )
