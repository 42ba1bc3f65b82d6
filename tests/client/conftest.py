"""A whole site for stap-client: real stap-server on loopback, real stap-loader running the
real stapbpf (through the test-only wrapper), trust stores in a private root, real users."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.loader.conftest import Loader, start_loader, stop_loader
from tests.server.helpers import Server, ensure_service_user, make_server
from tests.trust.bpfmodules import build_victim
from tests.trust.people import User, ensure_users, home_for, run_as, shared_tmpdir

HELLO = 'probe begin { printf ("Hello\\n"); exit (); }'


@dataclass
class Site:
    """One client host and the server it uses, with everything in temp directories."""

    base: Path
    trust_root: Path
    server: Server
    loader: Loader
    users: dict[str, User]
    homes: dict[str, Path]

    def run(
        self, who: str, argv: list[str], cwd: Path | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as ``who`` ("root" or a test user) in their home."""
        user = None if who == "root" else self.users[who]
        env = {"STAP_TRUST_ROOT": str(self.trust_root), "HOME": str(self.homes[who])}
        return run_as(user, argv, env, cwd or self.homes[who], timeout)

    def client(self, who: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``stap-client ARGS`` as ``who``."""
        return self.run(who, ["stap-client", *args])

    def authorize_server(self) -> None:
        """§6.2.1: root authorizes the server's certificate."""
        result = self.run("root", ["stap-authorize-server-cert", str(self.server.cert_path)])
        assert result.returncode == 0, result.stderr

    def authorize_signer(self) -> None:
        """§6.1.2: root authorizes the server as a module signer."""
        result = self.run("root", ["stap-authorize-signing-cert", str(self.server.cert_path)])
        assert result.returncode == 0, result.stderr

    @property
    def system_store(self) -> Path:
        return self.trust_root / "etc/systemtap/ssl/client"


@pytest.fixture(scope="session")
def users() -> dict[str, User]:
    """The real test users, by name."""
    return ensure_users()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """A real stap-server on loopback, shared by this worker's tests."""
    ensure_service_user()
    base = shared_tmpdir("sttest-srv-")
    # Programs the tests probe live in base/victim: the server's compiles may read it.
    (base / "victim").mkdir(mode=0o755)
    running = make_server(base, "server", SANDBOX_PATHS=str(base / "victim"))
    running.start()
    yield running
    running.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def victim(server: Server) -> Path:
    """A small program (function ``work``) where the server's compiles can see it."""
    return build_victim(server.root.parent / "victim")


@pytest.fixture
def site(server: Server, users: dict[str, User], stapbpf_wrapper: Path) -> Iterator[Site]:
    """A fresh client host: empty trust stores, a client.conf naming the server, a loader."""
    base = shared_tmpdir("sttest-site-")
    trust_root = base / "root"
    sysconf = trust_root / "etc/systemtap"
    sysconf.mkdir(parents=True)
    for directory in (trust_root, trust_root / "etc", sysconf):
        directory.chmod(0o755)
    loader = start_loader(base, stapbpf=stapbpf_wrapper, signer_store=sysconf / "staprun")
    (sysconf / "client.conf").write_text(
        "[client]\n"
        f"servers = 127.0.0.1:{server.port}\n"
        "runtime = bpf  # this host can only run BPF (see notes/real-systemtap-here.md)\n"
        f"loader_socket = {loader.socket}\n"
        f"stapbpf = {stapbpf_wrapper}\n"
    )
    homes = {name: home_for(user, base) for name, user in users.items()}
    homes["root"] = base / "home-root"
    homes["root"].mkdir()
    yield Site(base, trust_root, server, loader, users, homes)
    stop_loader(loader)
    shutil.rmtree(base, ignore_errors=True)
