"""The systemtap-compile-server and systemtap-compile-client packages: spec §6 as installed.

Built with systemtap-initscript by one ``dpkg-buildpackage`` run, installed on
this machine together, then walked through as a sysadmin would: start the
server as root (it becomes stap-server), authorize its certificate, compile and
run a script as root and, through stap-loader, as a member of stapusr; upgrade,
stop, remove and purge.

This changes the machine (/usr, /etc/stap-server, /etc/systemtap,
/var/lib/stap-server, /var/log/stap-server, /run), so the test waits for its
turn with the other package tests and its fixture stops what it started and
purges the packages, whatever happens. Other tests use temp directories and
the venv's commands; the server here listens on a free loopback port.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging.conftest import PACKAGES, BuiltDebs, unit_dir
from tests.server.helpers import free_port
from tests.trust.people import ensure_users, home_for, run_as, shared_tmpdir

SERVER_PACKAGE, CLIENT_PACKAGE = PACKAGES[1], PACKAGES[2]
# Installed commands by full path: the venv's, which the test users' PATH has
# first, must not stand in for them.
STAP_SERVER = Path("/usr/bin/stap-server")
STAP_CLIENT = Path("/usr/bin/stap-client")
AUTHORIZE_SERVER = Path("/usr/bin/stap-authorize-server-cert")
AUTHORIZE_SIGNER = Path("/usr/bin/stap-authorize-signing-cert")
STAP_LOADER = Path("/usr/sbin/stap-loader")
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SERVER_CONF = Path("/etc/stap-server/stap-server.conf")
CLIENT_CONF = Path("/etc/systemtap/client.conf")
STATE = Path("/var/lib/stap-server")
LOGS = Path("/var/log/stap-server")
CERT = STATE / ".systemtap/ssl/server/stap.cert"
KEY = STATE / ".systemtap/ssl/server/stap.key"
PID_FILE = Path("/run/stap-server/stap-server.pid")
SERVER_STORE = Path("/etc/systemtap/ssl/client")
SIGNER_STORE = Path("/etc/systemtap/staprun")
LOADER_SOCKET = Path("/run/stap-loader.sock")
HELLO = 'probe begin { printf ("Hello\\n"); exit (); }'


def run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command as root with a system PATH (and nothing from the venv)."""
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        env={
            "PATH": ROOT_PATH,
            "LANG": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
            **(env or {}),
        },
    )


def known_to_dpkg(package: str) -> bool:
    return run("dpkg-query", "-W", package).returncode == 0


def purge(*packages: str) -> None:
    present = [package for package in packages if known_to_dpkg(package)]
    if present:
        done = run("dpkg", "--purge", *present)
        assert done.returncode == 0, done.stderr


def server_pid() -> int | None:
    try:
        text = PID_FILE.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def alive(pid: int) -> bool:
    """Running, not a zombie (this machine's init may not reap daemons)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""
    except OSError:
        return False


def owner_mode(path: Path) -> tuple[str, str, int]:
    info = path.stat()
    owner, group = pwd.getpwuid(info.st_uid).pw_name, grp.getgrgid(info.st_gid).gr_name
    return owner, group, stat.S_IMODE(info.st_mode)


@pytest.fixture
def clean_machine(dpkg_turn: None) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """None of the packages before; afterwards no package, server, loader or state left.

    Yields a place to register processes the test starts (stopped at the end).
    """
    purge(*PACKAGES)
    for path in (SERVER_CONF, STATE, LOGS, CLIENT_CONF):
        if path.exists():
            pytest.fail(f"{path} exists but not from the packages; this test needs it absent")
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        yield started
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        pid = server_pid()
        if pid is not None and alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        purge(*PACKAGES)


def set_line(path: Path, key: str, line: str) -> None:
    """Replace the (possibly commented) ``key`` line of a config file, as an admin would."""
    text = path.read_text()
    new, count = re.subn(rf"^#?{key}\s*=.*$", line, text, count=1, flags=re.MULTILINE)
    assert count == 1, f"no {key} line in {path}"
    path.write_text(new)


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{path} did not appear: {log.read_text()}"
        time.sleep(0.05)


def deb_field(deb: Path, field: str) -> list[str]:
    """The package names in a relationship field (versions dropped)."""
    text = run("dpkg-deb", "-f", deb, field).stdout
    return [item.split()[0] for item in text.split(",") if item.strip()]


def deb_files(deb: Path) -> set[str]:
    """Every non-directory a .deb ships, as an absolute path."""
    listing = run("dpkg-deb", "-c", deb).stdout.splitlines()
    return {line.split()[5].removeprefix(".") for line in listing if not line.startswith("d")}


@pytest.mark.xdist_group("deb")
def test_each_package_ships_its_own_files_and_declares_what_it_needs(
    tmp_path: Path, built_debs: BuiltDebs
) -> None:
    files = {package: deb_files(built_debs.deb(package)) for package in PACKAGES}
    # Co-installable: no path in two packages (each has its own private Python code).
    for index, package in enumerate(PACKAGES):
        for other in PACKAGES[index + 1 :]:
            assert not files[package] & files[other], (package, other)
    server, client = files[SERVER_PACKAGE], files[CLIENT_PACKAGE]
    assert unit_dir(server) == unit_dir(client) == unit_dir(files["systemtap-initscript"])
    units = unit_dir(server)
    assert {str(STAP_SERVER), str(SERVER_CONF), str(units / "stap-server.service")} <= server
    assert "/usr/lib/systemtap-compile-server/stapinit/trust/certs.py" in server
    assert not any("/stapinit/client/" in f or "/stapinit/loader/" in f for f in server)
    commands = {STAP_CLIENT, AUTHORIZE_SERVER, AUTHORIZE_SIGNER, STAP_LOADER}
    assert {str(c) for c in commands} | {str(CLIENT_CONF)} <= client
    assert {str(units / "stap-loader.socket"), str(units / "stap-loader.service")} <= client
    assert not any("/stapinit/server/" in f or "/stapinit/initscript/" in f for f in client)

    server_deb, client_deb = built_debs.deb(SERVER_PACKAGE), built_debs.deb(CLIENT_PACKAGE)
    assert {"systemtap", "python3", "python3-cryptography", "adduser"} <= set(
        deb_field(server_deb, "Depends")
    )
    # Debian's own systemtap-server also ships /usr/bin/stap-server.
    assert deb_field(server_deb, "Conflicts") == ["systemtap-server"]
    # staprun and the stapusr/stapdev groups; stapbpf comes with systemtap.
    assert {"systemtap-runtime", "python3", "python3-cryptography"} <= set(
        deb_field(client_deb, "Depends")
    )
    assert deb_field(client_deb, "Recommends") == ["systemtap"]
    # stap needs the running kernel's headers for anything, and gcc for kernel modules.
    recommends = run("dpkg-deb", "-f", built_debs.deb("systemtap-initscript"), "Recommends")
    alternatives = [{n.split()[0] for n in i.split("|")} for i in recommends.stdout.split(",")]
    assert {"gcc"} in alternatives
    assert any("linux-headers-generic" in names for names in alternatives), alternatives
    conffiles = {}
    for package, deb in ((SERVER_PACKAGE, server_deb), (CLIENT_PACKAGE, client_deb)):
        control = tmp_path / package
        assert run("dpkg-deb", "-e", deb, control).returncode == 0
        conffiles[package] = set((control / "conffiles").read_text().split())
    assert conffiles[SERVER_PACKAGE] == {str(SERVER_CONF), "/etc/logrotate.d/stap-server"}
    assert conffiles[CLIENT_PACKAGE] == {str(CLIENT_CONF), "/etc/systemtap/stap-loader.conf"}


@pytest.mark.xdist_group("deb")
def test_compile_server_and_client_packages_walk_through_spec_6(
    tmp_path: Path,
    built_debs: BuiltDebs,
    stapbpf_wrapper: Path,
    clean_machine: dict[str, subprocess.Popen[bytes]],
) -> None:
    users = ensure_users()
    unit_path = unit_dir(deb_files(built_debs.deb(CLIENT_PACKAGE)))
    # All three packages install together: no file is shipped twice.
    installed = run("dpkg", "-i", *(built_debs.deb(p) for p in PACKAGES))
    assert installed.returncode == 0, installed.stdout + installed.stderr

    # The install step: the service user, the directories it owns, the stores.
    account = pwd.getpwnam("stap-server")
    assert account.pw_uid < 1000  # a system user
    assert (account.pw_dir, account.pw_shell) == (str(STATE), "/usr/sbin/nologin")
    assert owner_mode(STATE) == ("root", "root", 0o755)
    assert owner_mode(LOGS) == ("stap-server", "stap-server", 0o750)
    for store in (SERVER_STORE, SIGNER_STORE, SERVER_STORE.parent, SERVER_STORE.parent.parent):
        assert owner_mode(store) == ("root", "root", 0o755), store
    assert not list(SERVER_STORE.iterdir()) and not list(SIGNER_STORE.iterdir())
    # Enabled: the loader's socket only; a compile server must not serve by being installed.
    wants = Path("/etc/systemd/system")
    link = wants / "sockets.target.wants/stap-loader.socket"
    # To the shipped unit (Debian 13's helpers name it by its /usr path).
    assert link.resolve() == (unit_path / "stap-loader.socket").resolve()
    assert not list(wants.glob("*.wants/stap-server.service"))
    assert not list(wants.glob("*.wants/stap-loader.service"))
    units = [unit_path / name for name in ("stap-server.service", "stap-loader.socket")]
    verify = run("systemd-analyze", "verify", *units, unit_path / "stap-loader.service")
    assert (verify.returncode, verify.stderr) == (0, "")
    unit = (unit_path / "stap-server.service").read_text()
    assert f"\nExecStart={STAP_SERVER} -c {SERVER_CONF} run\n" in unit
    loader_unit = (unit_path / "stap-loader.service").read_text()
    assert f"\nExecStart={STAP_LOADER} --config /etc/systemtap/stap-loader.conf\n" in loader_unit

    # The administrator picks a port and names the server in the client config.
    port = free_port()
    set_line(SERVER_CONF, "PORT", f"PORT={port}")
    set_line(CLIENT_CONF, "servers", f"servers = 127.0.0.1:{port}")
    # Only the test's stapbpf is swapped in (the VM denies the memlock limit).
    set_line(CLIENT_CONF, "stapbpf", f"stapbpf = {stapbpf_wrapper}")

    # §6.1.3: started as root, the server becomes stap-server and makes its identity.
    started = run(STAP_SERVER, "start")
    assert started.returncode == 0, started.stderr
    pid = server_pid()
    assert started.stdout == f"stap-server (pid {pid}) started on https://127.0.0.1:{port}\n"
    assert pid is not None
    uids = Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[:4]
    assert uids == [str(account.pw_uid)] * 4
    # Root's key: nothing a compile runs (as stap-server) can read it.
    assert owner_mode(KEY) == ("root", "root", 0o600)
    assert owner_mode(CERT) == ("root", "root", 0o644)
    status = run(STAP_SERVER, "status")
    assert status.returncode == 0, status.stdout

    # §6.2.1: root authorizes the certificate; stap-client -p4 prints the module name.
    authorized = run(AUTHORIZE_SERVER, CERT)
    assert authorized.returncode == 0, authorized.stderr
    trusted = list(SERVER_STORE.glob("*.pem"))
    assert [p.read_bytes() for p in trusted] == [CERT.read_bytes()]
    assert owner_mode(trusted[0]) == ("root", "root", 0o644)
    work = tmp_path / "work"
    work.mkdir()
    home = {"HOME": str(tmp_path)}
    compiled = subprocess.run(
        [str(STAP_CLIENT), "-e", HELLO, "--runtime=bpf", "-p4"],
        capture_output=True,
        text=True,
        cwd=work,
        timeout=120,
        env={"PATH": ROOT_PATH, **home},
    )
    assert compiled.returncode == 0, compiled.stderr
    assert re.fullmatch(r"stap_\w+\.bo\n", compiled.stdout), compiled.stdout
    assert (work / compiled.stdout.strip()).stat().st_size > 0
    # Root loads what it compiled.
    hello = run(STAP_CLIENT, "-e", HELLO, "--runtime=bpf", env=home)
    assert (hello.returncode, hello.stdout) == (0, "Hello\n"), hello.stderr

    # §6.1.2: a stapusr member loads through stap-loader once the server is a trusted signer.
    log = tmp_path / "loader.log"
    with log.open("wb") as out:
        clean_machine["loader"] = subprocess.Popen(
            [str(STAP_LOADER), "--stapbpf", str(stapbpf_wrapper)],
            stdout=out,
            stderr=out,
            env={"PATH": ROOT_PATH},
        )
    wait_for_file(LOADER_SOCKET, clean_machine["loader"], log)
    assert stat.S_IMODE(LOADER_SOCKET.stat().st_mode) == 0o666
    signer = run(AUTHORIZE_SIGNER, CERT)
    assert signer.returncode == 0, signer.stderr
    base = shared_tmpdir("sttest-deb-")
    try:
        user = users["sttest_usr"]
        user_home = home_for(user, base)
        works = run_as(
            user,
            [str(STAP_CLIENT), "-e", HELLO, "--runtime=bpf", "--unprivileged"],
            {"HOME": str(user_home), "PATH": ROOT_PATH},
            user_home,
            timeout=120,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert (works.returncode, works.stdout) == (0, "Hello\n"), works.stderr
    clean_machine["loader"].send_signal(signal.SIGTERM)
    assert clean_machine.pop("loader").wait(10) == 0, log.read_text()
    assert not LOADER_SOCKET.exists()

    # An upgrade restarts a running server, with the same identity.
    identity = CERT.read_bytes()
    upgraded = run("dpkg", "-i", built_debs.deb(SERVER_PACKAGE))
    assert upgraded.returncode == 0, upgraded.stderr
    new_pid = server_pid()
    assert new_pid is not None and new_pid != pid and alive(new_pid) and not alive(pid)
    assert CERT.read_bytes() == identity

    stopped = run(STAP_SERVER, "stop")
    assert (stopped.returncode, stopped.stdout) == (0, f"stap-server (pid {new_pid}) stopped\n")
    assert run(STAP_SERVER, "status").returncode == 3
    assert "started" in (LOGS / "stap-server.log").read_text()

    # Removal stops a server started by hand and keeps identity, trust and configuration.
    assert run(STAP_SERVER, "start").returncode == 0
    last_pid = server_pid()
    assert last_pid is not None
    removed = run("dpkg", "--remove", SERVER_PACKAGE, CLIENT_PACKAGE)
    assert removed.returncode == 0, removed.stderr
    assert not alive(last_pid)
    for command in (STAP_SERVER, STAP_CLIENT, STAP_LOADER, AUTHORIZE_SERVER, AUTHORIZE_SIGNER):
        assert not command.exists(), command
    assert CERT.read_bytes() == identity and KEY.exists()
    assert [p.read_bytes() for p in SERVER_STORE.glob("*.pem")] == [identity]
    assert [p.read_bytes() for p in SIGNER_STORE.glob("*.pem")] == [identity]
    assert f"PORT={port}\n" in SERVER_CONF.read_text()
    assert f"servers = 127.0.0.1:{port}\n" in CLIENT_CONF.read_text()

    # Purging removes the identity, the log, the trusted certificates and the
    # configuration; the system user stays (see debian/*.postrm).
    purged = run("dpkg", "--purge", SERVER_PACKAGE, CLIENT_PACKAGE)
    assert purged.returncode == 0, purged.stderr
    for path in (STATE, LOGS, SERVER_CONF.parent, CLIENT_CONF, SERVER_STORE, SIGNER_STORE):
        assert not path.exists(), path
    assert not list(wants.glob("*.wants/stap-loader.socket"))
    assert pwd.getpwnam("stap-server").pw_uid == account.pw_uid
    assert Path("/etc/systemtap/config").exists()  # systemtap-initscript's: untouched
