"""What root runs and reads: finding a tool, and whether root may rely on a path.

Root must never run a program, or act on a file, that another user could have
put in place or could change: the file and every directory above it must be
root's and writable by nobody else (as OpenSSH's StrictModes and sudo judge
their files). Used by ``stap-loader`` (always root) and by ``stap-client``
when root runs a module itself.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Final

from stapinit.core.system import SYSTEM_PATH

#: Where root makes private work directories when ``$TMPDIR`` is not root's alone.
ROOT_TMP: Final = "/tmp"


def resolve_tool(name: str) -> str:
    """An absolute path for ``name``: as given if it has a slash, else found on SYSTEM_PATH.

    Never the caller's ``PATH``. Raises :class:`ValueError` (one line) for a
    relative path with a slash or a name not found.
    """
    if "/" in name:
        if not name.startswith("/"):
            raise ValueError(f"tool path {name!r} must be absolute")
        return name
    found = shutil.which(name, path=SYSTEM_PATH)
    if found is None:
        raise ValueError(f"{name} not found in {SYSTEM_PATH}")
    return found


def _entry_problem(path: str, st: os.stat_result, *, sticky_ok: bool) -> str | None:
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    mode = st.st_mode
    writable = mode & stat.S_IWOTH or (mode & stat.S_IWGRP and st.st_gid != 0)
    if writable and not (sticky_ok and stat.S_ISDIR(mode) and mode & stat.S_ISVTX):
        return f"{path} is writable by others (mode {stat.S_IMODE(mode):04o})"
    return None


def root_only_problem(path: str | Path, *, sticky_ok: bool = False) -> str | None:
    """Why root may not rely on ``path``, or ``None`` if only root can change it.

    ``path`` (after following symlinks) and every directory above it — both on
    the way as written and on the real path — must be owned by root and not
    writable by others (group-writable only by group root). A world-writable
    directory above it passes only with the sticky bit (``/tmp``), where nobody
    may rename another's entries; ``sticky_ok`` lets ``path`` itself be such a
    directory (a place to create a private directory in). A missing path is a
    problem: nothing is known about what may appear there.
    """
    written = Path(os.path.abspath(path))
    real = Path(os.path.realpath(written))
    try:
        st = os.stat(real)
    except OSError as exc:
        return f"cannot inspect {written}: {exc.strerror}"
    reason = _entry_problem(str(real), st, sticky_ok=sticky_ok)
    if reason:
        return reason
    for parent in dict.fromkeys([*real.parents, *written.parents]):
        try:
            pst = os.lstat(parent)
        except OSError as exc:
            return f"cannot inspect {parent}: {exc.strerror}"
        if stat.S_ISLNK(pst.st_mode):
            # Who may re-point it is decided by the directory holding it (checked
            # too); where it leads is checked on the real path.
            continue
        reason = _entry_problem(str(parent), pst, sticky_ok=True)
        if reason:
            return reason
    return None


def tool_for_root(name: str) -> str:
    """The absolute path of tool ``name``, checked fit for root to run.

    Raises :class:`ValueError` (one line) when it is not found or when another
    user could change it (:func:`root_only_problem`).
    """
    path = resolve_tool(name)
    reason = root_only_problem(path)
    if reason:
        raise ValueError(f"will not run {path} as root: {reason}")
    return path


def private_workdir(prefix: str) -> Path:
    """A new directory (mode 0700) that only this user may change, for a module file.

    Under root, ``$TMPDIR`` is used only if :func:`root_only_problem` finds it
    root's alone (with ``sudo -E`` it may be a user's, who could then swap the
    directory and so choose the module root runs); otherwise :data:`ROOT_TMP`.
    """
    parent: str | None = None
    if os.geteuid() == 0:
        parent = tempfile.gettempdir()
        if root_only_problem(parent, sticky_ok=True):
            parent = ROOT_TMP
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
