"""The message log and the console: every outcome reported once (spec §3.5).

Everything goes to ``LOG_FILE`` with a timestamp: messages, every command run
(``Exec: ...``) and stap's output (up to :data:`MAX_LOGGED_OUTPUT` characters
of each run: a compile server's answer is not to fill root's disk). Outcomes
(``Started X``) also go to stdout; errors and warnings to stderr and, when a
syslog socket exists, to syslog (which may not run yet at boot). A log that
cannot be written (a full file system) costs one warning, never the command:
stopping must always work.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

from stapinit.core.errors import StapinitError
from stapinit.initscript.ownership import open_regular, writable_by

_SYSLOG_SOCKET = "/dev/log"
#: Most of one tool's output written to the log (characters): its start and its end.
MAX_LOGGED_OUTPUT: Final = 64 * 1024


def clip_output(text: str, limit: int = MAX_LOGGED_OUTPUT) -> str:
    """``text`` if at most ``limit`` characters, else its first and last ``limit // 2``
    around a line saying how much was left out (pure)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    left_out = len(text) - 2 * half
    return f"{text[:half]}\n[... {left_out} characters of output left out ...]\n{text[-half:]}"


#: A message is one line of at most this many characters.
MAX_MESSAGE_CHARS = 2000


def one_line(message: str) -> str:
    """``message`` as one printable line, at most :data:`MAX_MESSAGE_CHARS`.

    Messages quote what others wrote (a server's error, a signature file, an
    option from an archive): a newline or an escape sequence there must not
    forge log lines or drive the terminal.
    """
    text = "".join(c if c.isprintable() else "?" for c in message)
    if len(text) > MAX_MESSAGE_CHARS:
        text = f"{text[:MAX_MESSAGE_CHARS]}... ({len(text) - MAX_MESSAGE_CHARS} more characters)"
    return text


class LogError(StapinitError):
    """The log file cannot be opened; str() names it."""


class Log:
    """Writes the service's messages to the log file, console and syslog."""

    def __init__(
        self, path: Path | None, console: TextIO | None = None, out: TextIO | None = None
    ) -> None:
        self.path = path
        self.console = console or sys.stderr
        self.out = out or sys.stdout
        self._handle: TextIO | None = None
        self._syslog_checked = False
        self._syslog = False
        # Scripts start in parallel threads; their lines must not interleave.
        self._lock = threading.Lock()

    def open(self) -> None:
        """Open the log file now, so a bad location fails before any work.

        The log itself, never what a symbolic link planted in its place points
        to, and only a regular file (a FIFO would block us, a device is not a
        log). Created ``0640``: it holds the scripts' tracing output. As root,
        a log that another user owns or may write, or that has another hard
        link (``/etc/shadow`` linked in where ``fs.protected_hardlinks`` is
        off), is refused: root would append to someone else's file.
        """
        if self.path is None or self._handle is not None:
            return
        if not self.path.parent.is_dir():
            raise LogError(f"log directory {self.path.parent} does not exist")
        try:
            fd = open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as error:
            raise LogError(f"cannot write log file {self.path}: {error.strerror}") from None
        facts = os.fstat(fd)
        who = writable_by(facts.st_uid, facts.st_mode) if os.geteuid() == 0 else None
        if who is not None or facts.st_nlink != 1:
            os.close(fd)
            why = f"it is writable by {who}" if who else "it has other hard links"
            raise LogError(f"refusing log file {self.path}: {why}")
        self._handle = os.fdopen(fd, "a+", encoding="utf-8", errors="replace")

    def close(self) -> None:
        """Close the log file (a failing flush is no error: see :meth:`_write`)."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            with contextlib.suppress(OSError):
                handle.close()

    def output_fd(self) -> int | None:
        """The log file's descriptor, for the scripts' own output; None without a log."""
        return self._handle.fileno() if self._handle is not None else None

    def _write(self, text: str) -> None:
        with self._lock:
            if self._handle is None:
                return
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            lines = "".join(
                f"{stamp} [{os.getpid()}] {line}\n" for line in text.splitlines() or [""]
            )
            try:
                self._handle.write(lines)
                self._handle.flush()
            except (OSError, ValueError) as error:
                # Keep going without the file: the console still says what happened.
                handle, self._handle = self._handle, None
                reason = getattr(error, "strerror", None) or str(error)
                print(
                    f"systemtap-service: warning: cannot write log file {self.path}: {reason};"
                    " logging to the console only",
                    file=self.console,
                )
                with contextlib.suppress(OSError):
                    handle.close()

    def report(self, message: str) -> None:
        """An outcome: log file and stdout."""
        message = one_line(message)
        self._write(message)
        print(message, file=self.out, flush=True)

    def info(self, message: str) -> None:
        """A message for the log file only."""
        self._write(one_line(message))

    def exec(self, argv: Sequence[str]) -> None:
        """Record a command about to run."""
        self._write("Exec: " + shlex.join(argv))

    def output(self, label: str, text: str) -> None:
        """Record a tool's output, clipped to :data:`MAX_LOGGED_OUTPUT` characters."""
        if text.strip():
            self._write(f"{label}:\n{clip_output(text.rstrip())}")

    def warning(self, message: str) -> None:
        """A warning: log file, stderr and syslog."""
        message = one_line(message)
        self._write(f"WARNING: {message}")
        print(f"systemtap-service: warning: {message}", file=self.console)
        self._to_syslog(4, message)

    def error(self, message: str) -> None:
        """An error: log file, stderr and syslog."""
        message = one_line(message)
        self._write(f"ERROR: {message}")
        print(f"systemtap-service: {message}", file=self.console)
        self._to_syslog(3, message)

    def _to_syslog(self, priority: int, message: str) -> None:
        if not self._syslog_checked:
            self._syslog_checked = True
            self._syslog = os.path.exists(_SYSLOG_SOCKET)
        if self._syslog:
            import syslog  # only when there is a syslog to talk to

            syslog.openlog("systemtap-service", 0, syslog.LOG_DAEMON)
            syslog.syslog(priority, message)
