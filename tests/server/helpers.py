"""A real ``stap-server`` process on loopback, and a small HTTPS client for it."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import platform
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from stapinit.protocol import CompileRequest, encode_compile_request
from tests.support import shared_install

#: The copy every user can run: a server started as root drops to the service user.
STAP_SERVER = shared_install.bin_dir() / "stap-server"
SERVICE_USER = "stap-server"
HOST = "127.0.0.1"
RELEASE = os.uname().release
ARCH = platform.machine()
HELLO = 'probe begin { println("hello"); exit() }\n'


def ensure_service_user() -> pwd.struct_passwd:
    """The ``stap-server`` system user, created if missing (the install step's job)."""
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--home-dir",
                "/var/lib/stap-server",
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ],
            check=True,
        )
        return pwd.getpwnam(SERVICE_USER)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Reply:
    """An HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    """One configured stap-server instance (started or not)."""

    root: Path
    port: int
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def conf(self) -> Path:
        return self.root / "stap-server.conf"

    @property
    def cert_path(self) -> Path:
        return self.state_dir / ".systemtap" / "ssl" / "server" / "stap.cert"

    @property
    def key_path(self) -> Path:
        return self.state_dir / ".systemtap" / "ssl" / "server" / "stap.key"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "stap-server.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "run" / "stap-server.pid"

    def write_config(self) -> None:
        values = {
            "PORT": str(self.port),
            "LISTEN_ADDRESS": HOST,
            "STATE_DIR": str(self.state_dir),
            "LOG_FILE": str(self.log_file),
            "PID_FILE": str(self.pid_file),
            "USER": SERVICE_USER,
            **self.settings,
        }
        self.conf.write_text("".join(f"{k}='{v}'\n" for k, v in values.items()))

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``stap-server -c CONF ARGS...`` and collect its output."""
        return subprocess.run(
            [str(STAP_SERVER), "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def command_with_env(
        self, *args: str, env: Mapping[str, str]
    ) -> subprocess.CompletedProcess[str]:
        """``command`` with ``env`` added to the environment (``PATH``, say)."""
        return subprocess.run(
            [str(STAP_SERVER), "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, **env},
        )

    def command_as(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``command`` run by ``user`` (without root's groups)."""
        entry = pwd.getpwnam(user)
        return subprocess.run(
            [str(STAP_SERVER), "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            user=entry.pw_uid,
            group=entry.pw_gid,
            extra_groups=[],
        )

    def start(self, *extra: str) -> None:
        """Start in the background and wait until it answers TLS."""
        proc = self.command(*extra, "start")
        assert proc.returncode == 0, proc.stderr
        self.wait_until_serving()

    def wait_until_serving(self) -> None:
        """Wait until a started server answers TLS."""
        deadline = time.monotonic() + 10
        while True:
            try:
                self.get("/")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.command("stop")

    def pid(self) -> int:
        return int(self.pid_file.read_text())

    def tls_context(self) -> ssl.SSLContext:
        """A client context trusting exactly this server's certificate."""
        ctx = ssl.create_default_context(cafile=str(self.cert_path))
        ctx.check_hostname = False
        return ctx

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> Reply:
        conn = http.client.HTTPSConnection(
            HOST, self.port, context=self.tls_context(), timeout=timeout
        )
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return Reply(resp.status, dict(resp.getheaders()), resp.read())
        finally:
            conn.close()

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def compile(self, req: CompileRequest, timeout: float = 60) -> Reply:
        return self.request(
            "POST",
            "/compile",
            encode_compile_request(req),
            {"Content-Type": "application/json"},
            timeout,
        )

    def log_text(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def log_lines(self, containing: str, count: int = 1, timeout: float = 5) -> list[str]:
        """Log lines with ``containing``, waiting until there are ``count`` of them.

        The server logs a request after answering it, so a client can be a moment early.
        """
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log_text().splitlines() if containing in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)


@contextlib.contextmanager
def running_server(prefix: str, **settings: str) -> Iterator[Server]:
    """A started server in a fresh directory under /tmp its user can traverse.

    Skips the test when not root (stap-server switches to its own user).
    """
    if os.geteuid() != 0:
        pytest.skip("stap-server runs as its own user: these tests run as root")
    ensure_service_user()
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    server = make_server(base, "server", **settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def make_server(base: Path, name: str, **settings: str) -> Server:
    """A configured (not started) server under ``base/name``."""
    root = base / name
    root.mkdir(mode=0o755)
    server = Server(root, free_port(), dict(settings))
    server.write_config()
    return server


def bpf_request(text: str = HELLO, **changes: Any) -> CompileRequest:
    """A request for the BPF runtime on this host's release and architecture."""
    base = CompileRequest(
        script_text=text, script_name="hello.stp", release=RELEASE, arch=ARCH, runtime="bpf"
    )
    return dataclasses.replace(base, **changes)


def stap_wrapper(directory: Path, name: str, body: str) -> Path:
    """An executable that runs ``body`` (sh) before exec'ing the real stap."""
    real = shutil.which("stap")
    assert real is not None
    path = directory / name
    path.write_text(
        "#!/bin/sh\n"
        f'case "$1" in -V) exec {real} "$@";; esac\n'  # startup's version probe stays quick
        f"{body}\n"
        f'exec {real} "$@"\n'
    )
    path.chmod(0o755)
    return path
