"""Facts about processes from /proc, so a recycled pid is never taken for ours."""

from __future__ import annotations

import os
import signal
import time


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), or ``None`` if it is gone.

    A zombie counts as gone: it has exited and only waits to be reaped.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def command_line(pid: int) -> list[str]:
    """The arguments ``pid`` was started with (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


def is_same_process(pid: int, expected_start: int) -> bool:
    """True when ``pid`` runs and is the process that started at ``expected_start``."""
    return pid > 0 and start_time(pid) == expected_start


def terminate(pid: int, expected_start: int, timeout: float) -> bool:
    """SIGTERM the process, then SIGKILL after ``timeout``; True once it is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        if not is_same_process(pid, expected_start):
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        if wait_until_gone(pid, expected_start, wait):
            return True
    return False


def wait_until_gone(pid: int, expected_start: int, timeout: float) -> bool:
    """Poll until the process is gone; False if it outlives ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while is_same_process(pid, expected_start):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True
