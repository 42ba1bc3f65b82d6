"""The Debian 13 root in which Debian 12 hosts compile real kernel modules, and the
``stap`` wrapper that runs its stap.

Debian 12's SystemTap 4.8 cannot build a module against any header package Debian 12
offers; Debian 13's SystemTap 5.1 can. So on an older host the tests debootstrap a
minimal Debian 13 with ``systemtap``, the kernel headers and ``gcc`` once, into
:data:`ROOT` (kept between runs; remove it to rebuild), and point ``STAP`` at a wrapper
that runs stap inside it. Built under a lock: xdist workers may ask at the same time.

Run as ``python -m tests.kmod_real.build_root`` to build it ahead of the tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

CACHE = Path("/var/cache/systemtap-initscript-tests")
ROOT = CACHE / "trixie-build"
SUITE = "trixie"
MIRROR = os.environ.get("STAPINIT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY = os.environ.get("STAPINIT_DEBIAN_SECURITY", "http://deb.debian.org/debian-security")
#: Marks a finished root; a build that died half way lacks it and is redone.
DONE = ".stapinit-build-root-complete"

#: The ``stap`` the service and the server are given: stap of ROOT, in a private
#: mount namespace where the host's /tmp, /dev and /proc appear inside ROOT, so the
#: paths stap is given and writes to (scripts, compile directories, the module) are
#: the same on both sides. Callers other than root (the compile server runs stap as
#: its service user) get a user namespace in which they are root.
WRAPPER = """#!/bin/sh
# stap of the Debian 13 root {root}, for the tests only: see tests/kmod_real/build_root.py.
# Only /tmp is shared: elsewhere (stap -V from a daemon in /) stap runs in the root's /.
# stap's own cache goes to the compile's directory, not the root's /root/.systemtap:
# the root stays as built, and every compile is a real one.
dir=$(pwd -P)
case "$dir/" in
    /tmp/*) SYSTEMTAP_DIR=${{SYSTEMTAP_DIR:-$dir/.systemtap}}; export SYSTEMTAP_DIR ;;
    *) dir=/ ;;
esac
if [ "$(id -u)" = 0 ]; then userns=; else userns=--map-root-user; fi
# shellcheck disable=SC2016  # expanded by the inner sh
exec /usr/bin/unshare $userns --mount --propagation private -- /bin/sh -euc '
    root=$1 dir=$2
    shift 2
    for fs in tmp dev proc; do mount --rbind "/$fs" "$root/$fs"; done
    exec /usr/sbin/chroot "$root" /bin/sh -c "cd \\"\\$0\\" && exec stap \\"\\$@\\"" "$dir" "$@"
' stap-wrapper {root} "$dir" "$@"
"""


class BuildRootError(Exception):
    """The root could not be built; ``str()`` says which step failed and why."""


def _run(argv: list[str], timeout: float, log: Path) -> None:
    with log.open("a") as out:
        out.write(f"+ {' '.join(argv)}\n")
        out.flush()
        try:
            done = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BuildRootError(f"{argv[0]}: {error} (log: {log})") from None
    if done.returncode != 0:
        raise BuildRootError(f"{' '.join(argv[:3])}... failed (exit {done.returncode}); see {log}")


def _arch() -> str:
    done = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def _build(target: Path, log: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise BuildRootError("debootstrap is not installed; run dev/setup-host --tests")
    _run(["debootstrap", "--variant=minbase", SUITE, str(target), MIRROR], 1200, log)
    (target / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\n"
        f"deb {MIRROR} {SUITE}-updates main\n"
        f"deb {SECURITY} {SUITE}-security main\n"
    )
    shutil.copy("/etc/resolv.conf", target / "etc/resolv.conf")
    packages = f"systemtap linux-headers-{_arch()} gcc"
    script = (
        'for fs in dev proc; do mount --rbind "/$fs" "$0/$fs"; done\n'
        'chroot "$0" apt-get update -qq\n'
        f'chroot "$0" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq'
        f" --no-install-recommends {packages}\n"
        'chroot "$0" apt-get clean\n'
    )
    _run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-euc", script, str(target)],
        1800,
        log,
    )
    (target / DONE).touch()


def ensure_root() -> Path:
    """The finished Debian 13 root, built first if missing (minutes, once per machine).

    Raises :class:`BuildRootError`.
    """
    if (ROOT / DONE).exists():
        return ROOT
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "trixie-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (ROOT / DONE).exists():  # another worker built it meanwhile
            return ROOT
        partial = ROOT.with_name(ROOT.name + ".partial")
        log = ROOT.with_name(ROOT.name + ".log")
        log.unlink(missing_ok=True)
        for old in (partial, ROOT):
            # --one-file-system: never into anything left mounted below.
            subprocess.run(["rm", "-rf", "--one-file-system", str(old)], check=False)
        _build(partial, log)
        partial.rename(ROOT)
    return ROOT


def write_wrapper(path: Path, root: Path) -> Path:
    """Write the ``stap`` wrapper for ``root`` at ``path`` (mode 0755); returns ``path``."""
    path.write_text(WRAPPER.format(root=root))
    path.chmod(0o755)
    return path


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        try:
            print(ensure_root())
        except BuildRootError as error:
            sys.exit(f"build_root: {error}")
