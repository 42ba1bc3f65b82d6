"""Real local users for the tests: one per kind of caller the spec distinguishes.

Created once (idempotently, under a lock, since xdist workers race) and left in
place: ``sttest_dev`` in stapdev, ``sttest_usr`` in stapusr, ``sttest_plain`` in
neither.  Commands run as them with their real groups and a HOME of the test's
choosing.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stapinit.core.system import SYSTEM_PATH as SYSTEM_PATH  # re-exported for the tests
from tests.support import shared_install

#: The commands, as a copy every user can run (tests/support/shared_install.py).
VENV_BIN = shared_install.bin_dir()
LOCK = Path("/run/lock/stapinit-test-users.lock")
WANTED: Mapping[str, tuple[str, ...]] = {
    "sttest_dev": ("stapdev",),
    "sttest_usr": ("stapusr",),
    "sttest_plain": (),
}


@dataclass(frozen=True)
class User:
    """A test user: name, ids, and every group the system gives them."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def _lookup(name: str) -> User:
    entry = pwd.getpwnam(name)
    return User(
        name, entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    )


def _group_names(user: User) -> set[str]:
    return {grp.getgrgid(g).gr_name for g in user.groups} - {grp.getgrgid(user.gid).gr_name}


def ensure_users() -> dict[str, User]:
    """Create (or repair) the test users; returns them by name."""
    if not reachable_by_all(VENV_BIN / "python"):
        raise RuntimeError(f"{VENV_BIN} must be reachable by every user for these tests")
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, groups in WANTED.items():
            try:
                user = _lookup(name)
            except KeyError:
                subprocess.run(
                    ["useradd", "-M", "-s", "/bin/sh", "-G", ",".join(groups), name]
                    if groups
                    else ["useradd", "-M", "-s", "/bin/sh", name],
                    check=True,
                )
                continue
            if _group_names(user) != set(groups):
                subprocess.run(["usermod", "-G", ",".join(groups), name], check=True)
    return {name: _lookup(name) for name in WANTED}


def shared_tmpdir(prefix: str) -> Path:
    """A fresh directory every user can reach (pytest's own tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def home_for(user: User, base: Path) -> Path:
    """A home directory owned by ``user`` under ``base``."""
    home = base / f"home-{user.name}"
    home.mkdir(mode=0o755)
    os.chown(home, user.uid, user.gid)
    return home


def reachable_by_all(path: Path) -> bool:
    """Whether any user may execute ``path`` (every directory above it searchable)."""
    real = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in (real, *real.parents))


def run_as(
    user: User | None,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user`` (None: root) with exactly ``env``; capture its output."""
    return subprocess.run(
        list(argv),
        env={"PATH": f"{VENV_BIN}:{SYSTEM_PATH}", "LANG": "C.UTF-8", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        user=None if user is None else user.uid,
        group=None if user is None else user.gid,
        extra_groups=None if user is None else list(user.groups),
    )
