"""The system tier: the built packages in a Debian booted with real systemd.

One container serves the whole tier (a boot costs seconds, a root build
minutes): it is booted once, the three packages are installed in it with
``dpkg -i`` as an administrator would, scripts and an ordinary service are
added, ``systemtap.service`` is enabled, and the machine is rebooted. Each test
then drives it and leaves it with the scripts running under the unit again.
Every test module sets ``pytestmark`` to the ``system`` mark (``-m "not
system"`` leaves the tier out; this conftest registers it) and the xdist group
"system", so one worker runs them all, on the one container.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.packaging.conftest import PACKAGES, BuiltDebs
from tests.packaging.conftest import built_debs as built_debs  # the same build, as a fixture
from tests.support.tools import SHIM_SOURCE
from tests.system.container import Container, ContainerError
from tests.system.rootfs import RootBuildError, ensure_root, host_suite

#: Where the test puts things inside (not part of the product).
DEBS = "/var/tmp/stapinit-debs"
SHIM = "/usr/local/lib/stapinit-test/memlock_shim.so"
STAPBPF = "/usr/local/sbin/stapbpf-test"
SCRIPTS = "/etc/systemtap/script.d"
OUTPUT = "/var/log/stapinit-test"
#: Two BPF scripts, the second requiring the first, with outputs to look at.
TICKER = """global ticks
probe timer.ms(100) { ticks++; if (ticks % 10 == 0) printf("tick %d\\n", ticks) }
probe end { printf("ticker stopped after %d ticks\\n", ticks) }
"""
COUNTER = """global n
probe timer.s(1) { n++; printf("count %d\\n", n) }
probe end { printf("counter stopped\\n") }
"""
SCRIPT_CONF = f"""ticker_OPT="--runtime=bpf -o {OUTPUT}/ticker.out"
counter_OPT="--runtime=bpf -o {OUTPUT}/counter.out"
counter_REQ=ticker
"""
#: An ordinary service (default dependencies, nothing about systemtap): at
#: shutdown it records what systemtap-service says about the scripts.
TRACEE_UNIT = f"""[Unit]
Description=An ordinary service the scripts trace

[Service]
Type=simple
ExecStart=/bin/sleep infinity
ExecStop=/bin/sh -c 'systemtap-service status > {OUTPUT}/status-when-tracee-stopped 2>&1'

[Install]
WantedBy=multi-user.target
"""
#: A member of stapusr (may load modules signed by a trusted signer).
USER = "alice"


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        time.sleep(0.2)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "system: boots the built packages under real systemd (tests/system)"
    )


def dependencies(debs: BuiltDebs) -> list[str]:
    """The packages the built packages depend on, first alternatives, without versions."""
    names: set[str] = set()
    for package in PACKAGES:
        done = subprocess.run(
            ["dpkg-deb", "-f", str(debs.deb(package)), "Depends"],
            capture_output=True,
            text=True,
            check=True,
        )
        for relation in done.stdout.split(","):
            name = relation.split("|")[0].split("(")[0].strip().partition(":")[0]
            if name and name not in PACKAGES:
                names.add(name)
    return sorted(names)


@pytest.fixture(scope="session")
def system_image(built_debs: BuiltDebs) -> Path:
    """The cached Debian root for the host's release (built now when missing)."""
    missing = [
        tool for tool in ("systemd-nspawn", "nsenter", "debootstrap") if not shutil.which(tool)
    ]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed; run dev/setup-host --tests")
    try:
        return ensure_root(host_suite(), dependencies(built_debs))
    except RootBuildError as error:
        pytest.fail(f"cannot build the system tier's root file system: {error}")


def provision(machine: Container, debs: BuiltDebs) -> None:
    """Install the packages and set the machine up as an administrator would."""
    # The tests' own parts: a build tree for the running kernel (as
    # dev/setup-host makes on the host) and the memlock shim (the VM withholds
    # CAP_SYS_RESOURCE, see tests/support/memlock_shim.c).
    headers = sorted(machine.path("/usr/src").glob("linux-headers-*-amd64"))
    if not headers:
        raise ContainerError("the root has no kernel headers")
    build = machine.path(f"/lib/modules/{os.uname().release}/build")
    build.parent.mkdir(parents=True, exist_ok=True)
    build.symlink_to(f"/usr/src/{headers[-1].name}")
    machine.path(SHIM).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHIM_SOURCE, machine.path("/usr/local/src/memlock_shim.c"))
    machine.check("gcc", "-shared", "-fPIC", "-O2", "-o", SHIM, "/usr/local/src/memlock_shim.c")
    machine.path(STAPBPF).write_text(f'#!/bin/sh\nLD_PRELOAD={SHIM} exec stapbpf "$@"\n')
    machine.path(STAPBPF).chmod(0o755)

    # Install, as an administrator does.
    machine.path(DEBS).mkdir(parents=True)
    files = [shutil.copy(debs.deb(package), machine.path(DEBS)) for package in PACKAGES]
    machine.check("dpkg", "-i", *(f"{DEBS}/{Path(name).name}" for name in files))

    # Configure: the shimmed stapbpf, two scripts, an ordinary service; enable.
    with machine.path("/etc/systemtap/config").open("a") as config:
        config.write(f"STAPBPF={STAPBPF}\n")
    for conf in ("/etc/systemtap/stap-loader.conf", "/etc/systemtap/client.conf"):
        text = machine.path(conf).read_text()
        machine.path(conf).write_text(text.replace("#stapbpf = stapbpf", f"stapbpf = {STAPBPF}"))
    machine.path(OUTPUT).mkdir()
    machine.path(f"{SCRIPTS}/ticker.stp").write_text(TICKER)
    machine.path(f"{SCRIPTS}/counter.stp").write_text(COUNTER)
    machine.path("/etc/systemtap/conf.d/tests.conf").write_text(SCRIPT_CONF)
    machine.path("/etc/systemd/system/tracee.service").write_text(TRACEE_UNIT)
    machine.check("useradd", "--create-home", "--groups", "stapusr", USER)
    # The container's network is a loopback only (see container.py): with nothing
    # to wait for, systemd-networkd-wait-online would hold network-online.target
    # (which stap-server.service wants) for its full two-minute timeout.
    machine.check("systemctl", "mask", "systemd-networkd-wait-online.service")
    machine.check("systemctl", "daemon-reload")
    machine.check("systemctl", "enable", "systemtap.service", "tracee.service")


@pytest.fixture(scope="session")
def machine(
    system_image: Path, built_debs: BuiltDebs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    """The booted container, packages installed and systemtap.service enabled, after a reboot."""
    container = Container(system_image, tmp_path_factory.mktemp("system"))
    try:
        container.mount()
        container.boot()
        provision(container, built_debs)
        container.reboot()
        yield container
    except ContainerError as error:
        pytest.fail(str(error))
    finally:
        container.destroy()
