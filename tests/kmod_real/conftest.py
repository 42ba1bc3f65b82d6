"""Real kernel modules, compiled once per test run and shared by the tests here.

SystemTap 5.1 (Debian 13) builds modules; 4.8 (Debian 12) does not against any header
package Debian 12 offers. So on a host whose stap is 5 or newer the tests use it and the
host's own headers; otherwise they use stap of a cached Debian 13 root
(``build_root.py``) through a wrapper named by ``STAP``. Either way the modules are for a
kernel this host does not run: nothing here loads one (this kernel has no module support;
loading is tested with stand-ins in tests/initscript/test_run_kmod_e2e.py).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kmod_real import build_root
from tests.support.kernels import own_build_releases
from tests.support.prefix import Prefix

#: Two small scripts: ``ticker`` requires ``hello``, so packing ``ticker`` brings both.
HELLO = 'probe begin { printf("hello\\n") }\nprobe end { printf("bye\\n") }\n'
TICKER = "global ticks\nprobe timer.s(1) { ticks++ }\n"
#: Modules only compile below /tmp when stap runs in the Debian 13 root (see the wrapper).
SHARED_TOP = Path("/tmp")


@dataclass(frozen=True)
class Toolchain:
    """What compiles kernel modules here: ``stap`` to name in ``STAP``, for ``release``."""

    stap: Path
    release: str
    root: Path | None  # the Debian 13 root stap runs in, or None: this host's stap

    @property
    def where(self) -> str:
        """For messages."""
        return "this host" if self.root is None else f"the Debian 13 root {self.root}"


@dataclass(frozen=True)
class Built:
    """A prefix whose ``compile -r RELEASE`` made real modules of ``hello`` and ``ticker``."""

    prefix: Prefix
    toolchain: Toolchain

    @property
    def cache(self) -> Path:
        return self.prefix.cache_dir(self.toolchain.release)


def stap_major(stap: str) -> int:
    """The major version ``stap -V`` reports (``version 5.1/0.192``), or 0."""
    done = subprocess.run([stap, "-V"], capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"version (\d+)\.", done.stdout + done.stderr)
    return int(found.group(1)) if found else 0


def shared_dir(prefix: str) -> Path:
    """A fresh root-only directory under /tmp, where the wrapper maps paths."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=SHARED_TOP))


@pytest.fixture(scope="session")
def toolchain() -> Iterator[Toolchain]:
    """This host's stap when it builds modules, else stap of the Debian 13 root."""
    host_stap = shutil.which("stap")
    if host_stap is not None and stap_major(host_stap) >= 5:
        releases = own_build_releases()
        if not releases:
            pytest.fail("no kernel headers with a build tree here; run dev/setup-host")
        yield Toolchain(Path(host_stap), releases[-1], None)
        return
    try:
        root = build_root.ensure_root()
    except build_root.BuildRootError as error:
        pytest.fail(f"cannot build the Debian 13 root for real kernel modules: {error}")
    releases = own_build_releases(root)
    if not releases:
        pytest.fail(f"{root} has no kernel headers; remove it to have it rebuilt")
    # Reachable by the compile server's service user, who runs stap too.
    directory = shared_dir("stapinit-kmod-stap-")
    directory.chmod(0o755)
    wrapper = build_root.write_wrapper(directory / "stap", root)
    yield Toolchain(wrapper, releases[-1], root)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def built(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """``systemtap-service compile -r RELEASE -y`` of both scripts, once per test run.

    Once, not once per xdist worker (pytest-xdist 3.8 ignores ``xdist_group``): the
    first worker compiles under a lock in the directory all workers of this run share,
    and every worker takes a copy of that prefix (or its failure). pytest's own clean-up
    of old runs removes them.
    """
    run_dir = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_dir = run_dir.parent
    base = run_dir / "kmod-real"
    if toolchain.root is not None and not base.is_relative_to(SHARED_TOP):
        pytest.fail(f"{base} is not under {SHARED_TOP}, where the stap wrapper maps paths")
    failure = base / "failure"
    with open(run_dir / "kmod-real.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prefix_dir = base / "build"
        if not prefix_dir.exists() and not failure.exists():
            prefix = Prefix(prefix_dir, {"STAP": str(toolchain.stap)})
            prefix.add_script("hello", HELLO)
            prefix.add_script("ticker", TICKER, requires="hello")
            done = prefix.run("compile", "-r", toolchain.release, "-y", timeout=600)
            if done.returncode != 0:
                failure.write_text(
                    f"compiling real modules with stap of {toolchain.where} failed:\n"
                    f"{done.stderr}\n{prefix.log()[-4000:]}"
                )
    if failure.exists():
        pytest.fail(failure.read_text())
    # A copy of this worker's own: the tests write to their prefix.
    own = tmp_path_factory.mktemp("kmod-built") / "build"
    shutil.copytree(prefix_dir, own, symlinks=True)
    return Built(Prefix(own, {"STAP": str(toolchain.stap)}), toolchain)
