"""The Debian root file system the system tier boots, cached between runs on one machine.

``/var/cache/systemtap-initscript-tests/<suite>-boot`` holds a debootstrapped
Debian with systemd, SystemTap, kernel headers and what the built packages
depend on, so that installing them needs no network. It is built when missing
(or when its recipe changed) into a temporary directory that is renamed into
place only once complete, under a lock, so concurrent runs build it once and
never boot a half-made root. Nothing ever boots the cache itself: each run
boots an overlay on top of it (see :mod:`tests.system.container`).

The tests add what the built packages depend on (:func:`ensure_root`), so a
new dependency rebuilds the root.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

CACHE = Path("/var/cache/systemtap-initscript-tests")
#: Debian's own mirror unless the environment names another.
MIRROR = os.environ.get("SYSTEM_TEST_MIRROR", "http://deb.debian.org/debian")
#: debootstrap's minimal base plus the init system (what a Debian install boots).
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus")
#: What the tier needs inside besides what the built packages depend on (see
#: :func:`ensure_root`): kernel headers (stap refuses to work without a build
#: tree), gcc for the tests' memlock shim, procps.
PACKAGES = ("systemtap", "linux-headers-amd64", "gcc", "libc6-dev", "procps")
#: Written last into a finished root: the recipe it was built from.
MARKER = ".stapinit-system-test-root"
BUILD_TIMEOUT = 40 * 60  # seconds, for debootstrap and for apt-get
LOCK_TIMEOUT = BUILD_TIMEOUT + 60


class RootBuildError(Exception):
    """The root could not be built; str() says which step failed and its output's tail."""


def host_suite() -> str:
    """The host's Debian release code name (``VERSION_CODENAME`` of /etc/os-release)."""
    suite = os.environ.get("SYSTEM_TEST_SUITE")
    if suite:
        return suite
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value.strip('"'):
            return value.strip('"')
    raise RootBuildError("/etc/os-release names no VERSION_CODENAME; set SYSTEM_TEST_SUITE")


def wanted(depends: Sequence[str]) -> list[str]:
    """:data:`PACKAGES` and ``depends``, sorted, without duplicates."""
    return sorted({*PACKAGES, *depends})


def recipe(suite: str, depends: Sequence[str]) -> str:
    """What the root is made of; a cached root with another recipe is rebuilt."""
    text = "\n".join([suite, MIRROR, *BASE_PACKAGES, *wanted(depends)])
    return hashlib.sha256(text.encode()).hexdigest()


def root_path(suite: str) -> Path:
    return CACHE / f"{suite}-boot"


def is_complete(root: Path, suite: str, depends: Sequence[str]) -> bool:
    try:
        return (root / MARKER).read_text().strip() == recipe(suite, depends)
    except OSError:
        return False


def _run(step: str, argv: list[str]) -> None:
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"},
        )
    except subprocess.TimeoutExpired:
        raise RootBuildError(f"{step}: did not finish within {BUILD_TIMEOUT}s") from None
    except FileNotFoundError:
        raise RootBuildError(
            f"{step}: {argv[0]} is not installed; run dev/setup-host --tests"
        ) from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        raise RootBuildError(f"{step} failed (exit {done.returncode}):\n{tail}")


def in_root(root: Path, *argv: str) -> list[str]:
    """``argv`` run inside ``root`` by systemd-nspawn (not booted), with the host's network."""
    return [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--resolv-conf=copy-host",
        "--setenv=DEBIAN_FRONTEND=noninteractive",
        "-D",
        str(root),
        *argv,
    ]


def build(target: Path, suite: str, depends: Sequence[str]) -> None:
    """debootstrap ``suite`` into ``target`` and install :func:`wanted` packages there."""
    _run(
        "debootstrap",
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            suite,
            str(target),
            MIRROR,
        ],
    )
    # No fsync per file: kernel headers alone are tens of thousands of files,
    # and a root that is lost in a crash is simply built again.
    (target / "etc/dpkg/dpkg.cfg.d/unsafe-io").write_text("force-unsafe-io\n")
    _run("apt-get update", in_root(target, "apt-get", "update", "-q"))
    _run(
        "apt-get install",
        in_root(
            target, "apt-get", "install", "-y", "-q", "--no-install-recommends", *wanted(depends)
        ),
    )
    _run("apt-get clean", in_root(target, "apt-get", "clean"))
    # Booted copies must not pretend to be this root's first boot (it would
    # ask questions on the console) nor share one machine id.
    (target / "etc/machine-id").write_text("uninitialized\n")
    (target / MARKER).write_text(recipe(suite, depends) + "\n")


def remove_tree(path: Path) -> None:
    """Delete a (half-built) root, unmounting first what debootstrap left mounted in it.

    An interrupted debootstrap leaves the host's /proc (and maybe /sys) mounted
    inside; deleting through them must never be tried.
    """
    mounted = [
        Path(line.split()[1].replace("\\040", " "))
        for line in Path("/proc/self/mounts").read_text().splitlines()
    ]
    for mount in sorted(mounted, key=lambda p: len(p.parts), reverse=True):
        if mount == path or path in mount.parents:
            subprocess.run(["umount", "--lazy", str(mount)], capture_output=True, timeout=30)
    shutil.rmtree(path)


def ensure_root(suite: str, depends: Sequence[str] = ()) -> Path:
    """The cached root for ``suite``, built now if missing or outdated.

    ``depends``: what the packages to be installed in it depend on (they are
    installed offline, with ``dpkg -i``). Raises :class:`RootBuildError`.
    Waits (bounded) for another run building it.
    """
    root = root_path(suite)
    CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
    with (CACHE / f".{suite}-boot.lock").open("w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RootBuildError(
                        f"another run held {lock.name} for {LOCK_TIMEOUT}s"
                    ) from None
                time.sleep(1)
        if is_complete(root, suite, depends):
            return root
        fresh = root.with_name(root.name + ".new")
        for leftover in (fresh, root):
            if leftover.exists():
                remove_tree(leftover)
        build(fresh, suite, depends)
        fresh.rename(root)
    return root
