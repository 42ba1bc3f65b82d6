"""The pid file: which process is the running server.

Written by whoever started the server (root, when started as root: see
:mod:`stapinit.server.background`) through a temp file and a rename; read
without following symlinks or blocking, as a small regular file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from stapinit.core.fsutil import atomic_write
from stapinit.core.process import command_line, start_time
from stapinit.server.errors import StapServerError, path_error

#: A pid file holds a number and a newline; anything longer is not one.
_MAX_BYTES = 32


def read_pid(pid_file: Path) -> int | None:
    """The pid recorded in ``pid_file``; None when there is none; 0 when it is unusable.

    Raises :class:`StapServerError` when it cannot be read (permissions).
    """
    try:
        fd = os.open(pid_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink: not a pid file we wrote
            return 0
        raise path_error("read PID_FILE", pid_file, exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 0
        raw = os.read(fd, _MAX_BYTES + 1)
    finally:
        os.close(fd)
    text = raw.decode("ascii", "replace").strip()
    if len(raw) > _MAX_BYTES or not (text.isascii() and text.isdigit()) or int(text) <= 0:
        return 0
    return int(text)


def write_pid_file(pid_file: Path, pid: int) -> None:
    """Record ``pid`` through a temp file and a rename.

    Raises :class:`StapServerError` saying what to change when it cannot.
    """
    try:
        atomic_write(pid_file, f"{pid}\n".encode("ascii"), durable=False)
    except OSError as exc:
        error = path_error("write PID_FILE", pid_file, exc)
        raise StapServerError(
            f"{error}; make {pid_file.parent} writable by uid {os.geteuid()} or set "
            "PID_FILE to a file in a directory it can write",
            error.exit_code,
        ) from None


def remove_pid_file(pid_file: Path, pid: int) -> None:
    """Remove ``pid_file`` if it still names ``pid`` (a newer server may own it)."""
    try:
        if read_pid(pid_file) == pid:
            pid_file.unlink()
    except (OSError, StapServerError):
        pass  # not ours to remove (root wrote it): the next stop or start clears it


def is_server(pid: int) -> bool:
    """Whether ``pid`` is a live stap-server process (not a recycled pid)."""
    if start_time(pid) is None:  # gone, or a zombie
        return False
    argv = command_line(pid)
    # Guards against a recycled pid after a crash; zombies have no command line.
    return any("stap-server" in arg for arg in argv)
