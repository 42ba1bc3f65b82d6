"""The Debian package: build it, install it on this machine, run spec §5.3, remove it.

This changes the machine (/usr, /etc/systemtap, /var/cache/systemtap,
/var/log/systemtap.log), so it is one test function -- one xdist worker -- that
waits for its turn with the other package tests, and its fixture purges the
package and the example it added, whatever happens. Other tests never use those
paths: they run the venv's command with ``-c``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging.conftest import REPO, SYSTEM_PATH, BuiltDebs, unit_dir
from tests.support.prefix import RELEASE, process_alive, wait_for

PACKAGE = "systemtap-initscript"
EXAMPLE = REPO / "examples" / "script.d" / "heartbeat.stp"
SCRIPT = Path("/etc/systemtap/script.d/heartbeat.stp")
CONF = Path("/etc/systemtap/conf.d/heartbeat.conf")
CONFIG = Path("/etc/systemtap/config")
CACHE = Path("/var/cache/systemtap")


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PATH": SYSTEM_PATH, "DEBIAN_FRONTEND": "noninteractive"},
    )


def known_to_dpkg() -> bool:
    return run("dpkg-query", "-W", PACKAGE).returncode == 0


def purge() -> None:
    if known_to_dpkg():
        done = run("dpkg", "--purge", PACKAGE)
        assert done.returncode == 0, done.stderr


def kill_example() -> None:
    with contextlib.suppress(OSError):
        for line in Path("/var/run/systemtap/heartbeat").read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "pid" and value.isdigit() and process_alive(int(value)):
                os.kill(int(value), signal.SIGKILL)


@pytest.fixture
def clean_machine(dpkg_turn: None) -> Iterator[None]:
    """No package before; afterwards no package, no example and no directory we made."""
    purge()
    if CONFIG.exists():
        pytest.fail(f"{CONFIG} exists but not from {PACKAGE}; this test needs it absent")
    try:
        yield
    finally:
        kill_example()
        purge()
        for path in (SCRIPT, CONF, *CACHE.glob("*/heartbeat.*")):
            path.unlink(missing_ok=True)
        for directory in (*CACHE.glob("*"), CACHE, SCRIPT.parent, CONF.parent, CONFIG.parent):
            with contextlib.suppress(OSError):
                directory.rmdir()


def rc_links(prefix: str) -> list[Path]:
    return sorted(Path("/etc").glob(f"rc?.d/{prefix}*systemtap"))


@pytest.mark.xdist_group("deb")
def test_deb_builds_installs_runs_the_example_and_uninstalls(
    tmp_path: Path, stapbpf_wrapper: Path, built_debs: BuiltDebs, clean_machine: None
) -> None:
    deb = built_debs.deb(PACKAGE)

    depends = run("dpkg-deb", "-f", deb, "Depends").stdout
    assert "systemtap" in [item.split()[0] for item in depends.split(",")]
    listing = run("dpkg-deb", "-c", deb).stdout
    shipped = {line.split()[-1].removeprefix(".") for line in listing.splitlines()}
    for path in (
        "/usr/sbin/systemtap-service",
        "/etc/systemtap/config",
        "/etc/systemtap/script.d/",
        "/etc/systemtap/conf.d/",
        "/var/cache/systemtap/",
        "/etc/init.d/systemtap",
        str(unit_dir(shipped) / "systemtap.service"),
        "/etc/logrotate.d/systemtap",
        "/etc/kernel/postinst.d/systemtap",
        "/etc/kernel/postrm.d/systemtap",
        "/usr/share/man/man8/systemtap-service.8.gz",
        "/usr/share/bash-completion/completions/systemtap-service",
    ):
        assert path in shipped, path
    control = tmp_path / "control"
    assert run("dpkg-deb", "-e", deb, control).returncode == 0
    conffiles = (control / "conffiles").read_text().split()
    assert {"/etc/systemtap/config", "/etc/init.d/systemtap"} <= set(conffiles)

    installed = run("dpkg", "-i", deb)
    assert installed.returncode == 0, installed.stderr
    # Installing enables nothing (spec §5.3-5.4: test first, then enable).
    assert rc_links("S") == []
    assert not list(Path("/etc/systemd/system").glob("*.wants/systemtap.service"))
    verify = run("systemd-analyze", "verify", str(unit_dir(shipped) / "systemtap.service"))
    assert (verify.returncode, verify.stderr) == (0, "")
    man = run("man", "--warnings", "systemtap-service")
    assert (man.returncode, man.stderr) == (0, "")
    assert "pack" in man.stdout and "ALLOW_CACHEONLY" in man.stdout

    # §5.2-5.3 with the shipped BPF example; only the test's stapbpf is swapped in.
    shutil.copy(EXAMPLE, SCRIPT)
    out = tmp_path / "heartbeat.out"
    CONF.write_text(f'heartbeat_OPT="--runtime=bpf -o {out}"\n')
    with CONFIG.open("a") as config:
        config.write(f"STAPBPF={stapbpf_wrapper}\n")
    started = run("service", "systemtap", "start")
    assert started.returncode == 0, started.stderr
    match = re.search(r"^Started heartbeat \(pid (\d+)\)$", started.stdout, re.MULTILINE)
    assert match, started.stdout
    status = run("service", "systemtap", "status")
    assert (status.returncode, status.stdout) == (0, f"heartbeat({match[1]}) is running...\n")
    assert wait_for(lambda: "beat 1" in out.read_text(), timeout=5)
    stopped = run("service", "systemtap", "stop")
    assert (stopped.returncode, stopped.stdout) == (0, "Stopped heartbeat\n")
    assert out.read_text().splitlines()[-1].startswith("heartbeat stopped after")
    status = run("service", "systemtap", "status")
    assert (status.returncode, status.stdout) == (3, "heartbeat is stopped\n")
    assert "Started heartbeat" in Path("/var/log/systemtap.log").read_text()

    # Enabling is one command, as is going back.
    assert run("update-rc.d", "systemtap", "enable").returncode == 0
    assert [link.parent.name for link in rc_links("S")] == ["rc2.d", "rc3.d", "rc4.d", "rc5.d"]
    assert run("update-rc.d", "systemtap", "disable").returncode == 0
    assert rc_links("S") == []

    # The kernel hook compiles ahead for every kernel with a build tree.
    releases = sorted(p.parent.parent.name for p in Path("/lib/modules").glob("*/build/.config"))
    hook = run("/etc/kernel/postinst.d/systemtap", releases[0], f"/boot/vmlinuz-{releases[0]}")
    assert hook.returncode == 0, hook.stderr
    assert f"heartbeat is up to date for {RELEASE}" in hook.stdout
    for release in releases:
        assert (CACHE / release / "heartbeat.bo").is_file(), release

    removed = run("dpkg", "--remove", PACKAGE)
    assert removed.returncode == 0, removed.stderr
    assert not Path("/usr/sbin/systemtap-service").exists()
    assert SCRIPT.read_bytes() == EXAMPLE.read_bytes() and CONF.exists()
    assert f"STAPBPF={stapbpf_wrapper}\n" in CONFIG.read_text()  # conffile kept

    purged = run("dpkg", "--purge", PACKAGE)
    assert purged.returncode == 0, purged.stderr
    assert SCRIPT.read_bytes() == EXAMPLE.read_bytes() and CONF.exists()
    assert not CONFIG.exists()
    assert not Path("/etc/init.d/systemtap").exists()
    assert rc_links("") == []
