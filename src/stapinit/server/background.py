"""Going to the background: fork early, report readiness, record the pid as the starter.

``stap-server start`` forks before it does anything else.  The child sets the
server up (as root it prepares directories, reads the identity, binds the port
and becomes ``USER``; then it checks stap and the sandbox) and reports on a
pipe either that it serves or the one-line error that stopped it, with its
exit code.  The parent waits for that report, prints it, and on success
writes the pid file itself -- so the pid file is written by whoever started
the server (root, usually: a directory such as ``/run/stap-server`` that only
root may write is fine, and the service user can never plant another pid
there for root's ``stop`` to signal).
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from stapinit.core.errors import StapinitError
from stapinit.core.lsb import EXIT_FAILED, EXIT_OK, EXIT_PRIVILEGE
from stapinit.core.process import Process
from stapinit.server.errors import StapServerError
from stapinit.server.pidfile import write_pid_file

#: How long ``start`` waits for the server to report (stap -V, key generation).
STARTUP_TIMEOUT: Final = 180.0
_READY: Final = b"ready\n"
_MAX_REPORT: Final = 4096


class Readiness:
    """The child's end of the report pipe (a no-op in the foreground)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def ready(self) -> None:
        """The server is about to serve: tell the parent, leave the terminal."""
        detached = self._fd is not None
        self._send(_READY)
        if detached:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)

    def failed(self, code: int, message: str) -> None:
        """Start-up failed with ``message`` (one line) and exit ``code``."""
        self._send(f"{code} {message}\n".encode("utf-8", "replace")[:_MAX_REPORT])

    def _send(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        except OSError:
            pass  # the parent is gone (killed): nobody to tell
        finally:
            os.close(self._fd)
            self._fd = None


def check_pid_directory(pid_file: Path) -> None:
    """Fail before forking when the pid file cannot be written by us.

    A missing directory is judged by its nearest existing ancestor, where it
    would be made.
    """
    directory = pid_file.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not os.access(directory, os.W_OK | os.X_OK):
        uid = os.geteuid()
        fix = "start the server as root, or " if uid else ""
        raise StapServerError(
            f"cannot write pid file {pid_file}: {directory} is not writable by uid {uid}; "
            f"{fix}set PID_FILE to a file in a directory this user can write",
            EXIT_PRIVILEGE,
        )


def detach(serve: Callable[[Readiness], int], pid_file: Path, started: Callable[[int], str]) -> int:
    """Run ``serve`` in a background child; return ``start``'s exit status.

    ``serve`` calls :meth:`Readiness.ready` once set up, then serves and returns
    its exit status; a :class:`StapinitError` before that is reported by the
    parent.  ``started(pid)`` is the line printed on success.
    """
    check_pid_directory(pid_file)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's end is checked by the end-to-end tests
        os.close(read_end)
        os.setsid()
        os._exit(_child(serve, Readiness(write_end)))
    os.close(write_end)
    try:
        report = _read_report(read_end)
    finally:
        os.close(read_end)
    child = Process.of(pid)
    if report == _READY:
        try:
            pid_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            write_pid_file(pid_file, pid)
        except OSError as exc:
            if child is not None:
                child.terminate(5.0)
            raise StapServerError(
                f"cannot make the directory of PID_FILE {pid_file}: {exc.strerror}"
            ) from None
        except StapServerError:
            if child is not None:
                child.terminate(5.0)
            raise
        print(started(pid))
        return EXIT_OK
    if child is not None:
        child.terminate(5.0)
    status = _reap(pid)
    code, _, message = report.decode("utf-8", "replace").strip().partition(" ")
    if code.isdigit() and message:
        raise StapServerError(message, int(code))
    if not report:
        raise StapServerError(f"stap-server exited during start-up ({status})")
    raise StapServerError(f"stap-server did not report within {STARTUP_TIMEOUT:g}s")


def _child(serve: Callable[[Readiness], int], readiness: Readiness) -> int:
    try:
        return serve(readiness)
    except StapinitError as exc:
        readiness.failed(exc.exit_code, str(exc))
        return exc.exit_code
    except BaseException as exc:  # the one-line promise holds in the child too
        readiness.failed(EXIT_FAILED, f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        sys.stdout.flush()


def _read_report(fd: int) -> bytes:
    """What the child wrote before closing its end (empty if it died first)."""
    data = b""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while len(data) <= _MAX_REPORT:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return b"timeout"
        chunk = os.read(fd, _MAX_REPORT)
        if not chunk:
            break
        data += chunk
    return data


def _reap(pid: int) -> str:
    """Wait for the child (it has exited or was stopped); how it ended."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "status unknown"
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
