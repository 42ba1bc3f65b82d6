"""The message log (spec §3.5).

Everything goes to ``LOG_FILE`` with a timestamp: messages, every command run
(``Exec: ...``) and stap's full output. Errors and warnings also go to stderr
and, when a syslog socket exists, to syslog (which may not run yet at boot).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

_SYSLOG_SOCKET = "/dev/log"


class LogError(Exception):
    """The log file cannot be opened; str() names it."""


class Log:
    """Writes the service's messages to the log file, console and syslog."""

    def __init__(self, path: Path | None, console: TextIO | None = None) -> None:
        self.path = path
        self.console = console or sys.stderr
        self._handle: TextIO | None = None
        self._syslog_checked = False
        self._syslog = False

    def open(self) -> None:
        """Open the log file now, so a bad location fails before any work."""
        if self.path is None or self._handle is not None:
            return
        if not self.path.parent.is_dir():
            raise LogError(f"log directory {self.path.parent} does not exist")
        try:
            self._handle = self.path.open("a", encoding="utf-8", errors="replace")
        except OSError as error:
            raise LogError(f"cannot write log file {self.path}: {error.strerror}") from None

    def close(self) -> None:
        """Close the log file."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _write(self, text: str) -> None:
        if self._handle is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for line in text.splitlines() or [""]:
            self._handle.write(f"{stamp} [{os.getpid()}] {line}\n")
        self._handle.flush()

    def info(self, message: str) -> None:
        """A message for the log file only."""
        self._write(message)

    def exec(self, argv: Sequence[str]) -> None:
        """Record a command about to run."""
        self._write("Exec: " + shlex.join(argv))

    def output(self, label: str, text: str) -> None:
        """Record a tool's output in full."""
        if text.strip():
            self._write(f"{label}:\n{text.rstrip()}")

    def warning(self, message: str) -> None:
        """A warning: log file, stderr and syslog."""
        self._write(f"WARNING: {message}")
        print(f"systemtap-service: warning: {message}", file=self.console)
        self._to_syslog(4, message)

    def error(self, message: str) -> None:
        """An error: log file, stderr and syslog."""
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
