"""stap-server.service and stap-loader.socket under real systemd.

The server is enabled and started as its package says; root authorizes it as
server and signer; a member of stapusr then compiles through it and loads the
signed BPF module through the socket-activated loader.
"""

from __future__ import annotations

import pytest

from tests.system.conftest import USER, wait_until
from tests.system.container import Container

pytestmark = [pytest.mark.system, pytest.mark.xdist_group("system")]
CERT = "/var/lib/stap-server/.systemtap/ssl/server/stap.cert"
SOCKET = "/run/stap-loader.sock"
HELLO = 'probe begin { printf ("Hello\\n"); exit (); }'
SERVER = "--server=127.0.0.1:9740"  # stap-server.conf's defaults


@pytest.fixture(scope="module")
def server(machine: Container) -> str:
    """stap-server.service enabled and started, and trusted by root as server and signer."""
    machine.check("systemctl", "enable", "--now", "stap-server.service")
    # Made on first start: the identity root authorizes.
    wait_until("the server's certificate", lambda: machine.path(CERT).exists())
    for authorize in ("stap-authorize-server-cert", "stap-authorize-signing-cert"):
        machine.check(authorize, CERT)
    return SERVER


def test_stap_server_service_starts_and_serves(machine: Container, server: str) -> None:
    shown = machine.run("systemctl", "status", "stap-server.service")
    assert shown.returncode == 0 and "active (running)" in shown.stdout, shown.stdout
    # It found the kernel build trees: a compile for the running kernel works.
    hello = machine.run("stap-client", server, "--runtime=bpf", "-e", HELLO)
    assert (hello.returncode, hello.stdout) == (0, "Hello\n"), hello.stderr
    # The unit's hardening still holds: it may not load kernel modules.
    show = machine.run(
        "systemctl", "show", "-P", "CapabilityBoundingSet", "stap-server.service"
    ).stdout
    assert "cap_sys_module" not in show
    filtered = machine.run("systemctl", "show", "-P", "SystemCallFilter", "stap-server.service")
    assert "init_module" in filtered.stdout


def test_loader_socket_activates_the_loader_for_a_stapusr_member(
    machine: Container, server: str
) -> None:
    assert machine.run("systemctl", "is-active", "stap-loader.socket").stdout.strip() == "active"
    assert machine.run("systemctl", "is-active", "stap-loader.service").stdout.strip() != "active"

    hello = machine.run(
        "sh",
        "-c",
        f"cd && exec stap-client {server} --runtime=bpf --unprivileged -e '{HELLO}'",
        user=USER,
    )
    assert (hello.returncode, hello.stdout) == (0, "Hello\n"), hello.stderr
    assert machine.run("systemctl", "is-active", "stap-loader.service").stdout.strip() == "active"
    journal = machine.run("journalctl", "-b", "-u", "stap-loader.service", "-o", "cat").stdout
    assert f"user '{USER}' may load" in journal, journal


def test_stopping_the_loader_socket_removes_its_file(machine: Container) -> None:
    assert machine.run("test", "-S", SOCKET).returncode == 0
    machine.check("systemctl", "stop", "stap-loader.socket")
    try:
        assert machine.run("test", "-e", SOCKET).returncode != 0
        assert (
            machine.run("systemctl", "is-active", "stap-loader.service").stdout.strip() != "active"
        )
    finally:
        machine.check("systemctl", "start", "stap-loader.socket")
    assert machine.run("test", "-S", SOCKET).returncode == 0
