"""One state-changing command at a time: an exclusive lock under ``STAT_PATH``."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from stapinit.core.errors import StapinitError

LOCK_NAME = ".lock"


class LockError(StapinitError):
    """The lock could not be taken in time (str() names who holds it) or is no plain file."""


class CommandLock:
    """An exclusive ``flock`` on ``STAT_PATH/.lock``, waited for a bounded time.

    ``interrupted`` (polled while waiting) ends the wait early: SIGTERM must
    not have to outlast ``LOCK_TIMEOUT``.
    """

    def __init__(
        self,
        stat_path: Path,
        timeout: float,
        command: str,
        interrupted: Callable[[], bool] = lambda: False,
        preempt: Callable[[int], None] | None = None,
    ) -> None:
        self.path = stat_path / LOCK_NAME
        self.timeout = timeout
        self.command = command
        self.interrupted = interrupted
        # stop must win over a start stuck waiting for a loader: it asks the
        # holder to give up (SIGTERM ends its waits promptly) and takes over.
        self.preempt = preempt
        self._fd: int | None = None

    def _open(self) -> int:
        """Open (or create) the lock file itself, never what a symlink there points to.

        ``STAT_PATH`` may sit where others could plant a link; following it
        would truncate the file it names. O_NONBLOCK keeps a FIFO from hanging us.
        """
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            # 0600: flock needs only read access, so a lock file others can
            # open is a lock anyone can hold, keeping root's commands out.
            fd = os.open(self.path, flags, 0o600)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise LockError(f"refusing lock file {self.path}: it is a symbolic link") from None
            raise LockError(f"cannot open lock file {self.path}: {error.strerror}") from None
        facts = os.fstat(fd)
        if not stat.S_ISREG(facts.st_mode):
            os.close(fd)
            raise LockError(f"refusing lock file {self.path}: it is not a regular file")
        if facts.st_uid == os.geteuid() and facts.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # made by an earlier version, readable by all
        return fd

    def __enter__(self) -> CommandLock:
        fd = self._open()
        deadline = time.monotonic() + self.timeout
        preempted = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if self.preempt is not None and not preempted:
                    preempted = True
                    pid = lock_holder(fd)
                    if pid is not None and pid != os.getpid():
                        self.preempt(pid)
                if self.interrupted():
                    os.close(fd)
                    raise LockError(f"interrupted while waiting for {self.path}", 130) from None
                if time.monotonic() >= deadline:
                    note = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    # What the holder wrote, shown as one line whatever it holds.
                    holder = "".join(c if c.isprintable() else "?" for c in note) or "unknown"
                    os.close(fd)
                    raise LockError(
                        f"another systemtap-service holds {self.path} ({holder}); "
                        f"gave up after {self.timeout:g}s"
                    ) from None
                time.sleep(0.05)
        # Who holds it, for the message of a command that gives up waiting; a
        # full file system (a small /run at shutdown) must not stop the command.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {self.command}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def lock_holder(fd: int) -> int | None:
    """The pid holding a ``flock`` on the file open as ``fd``, from ``/proc/locks`` (proc(5))."""
    facts = os.fstat(fd)
    device = f"{os.major(facts.st_dev):02x}:{os.minor(facts.st_dev):02x}:{facts.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as handle:
            lines = handle.read(1 << 20).splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; "->" marks a waiter.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            return int(fields[4]) if fields[4].isdigit() else None
    return None
