"""Process control: identify a process by pid and start time, stop it, bound every wait.

One implementation for every program: the boot-time service stopping a
``stapbpf`` it started in an earlier run, the loader stopping a client's
module, the server stopping a compile, the client stopping its loader.
Facts come from ``/proc`` (proc(5)), so a recycled pid is never taken for ours.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

#: After SIGKILL a process is gone within this, unless it is stuck in the
#: kernel (uninterruptible sleep), which no signal can end.
KILL_WAIT_SECONDS = 2.0


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
    if len(fields) < 20 or fields[0] in ("Z", "X") or not fields[19].isdigit():
        return None
    return int(fields[19])


def command_line(pid: int) -> list[str]:
    """The arguments ``pid`` was started with (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read(1 << 16)
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


def status_fields(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as ``key -> value`` (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as handle:
            text = handle.read(1 << 16)
    except OSError:
        return {}
    return {
        key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())
    }


def catches_signal(pid: int, signum: int) -> bool:
    """True when ``pid`` has installed a handler for ``signum`` (``SigCgt``, proc(5))."""
    mask = status_fields(pid).get("SigCgt", "")
    try:
        return bool(int(mask, 16) >> (signum - 1) & 1)
    except ValueError:
        return False


def pids() -> list[int]:
    """Every process id in ``/proc``."""
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []


def owner(pid: int) -> int | None:
    """The real user id of ``pid``, or ``None`` if it is gone."""
    uids = status_fields(pid).get("Uid", "").split()
    return int(uids[0]) if uids and uids[0].isdigit() else None


class Ending(enum.Enum):
    """How :meth:`Process.terminate` or :func:`stop_child` ended a process."""

    GONE = "gone"  # it had already exited
    TERMINATED = "terminated"  # it exited on SIGTERM (its own clean-up ran)
    KILLED = "killed"  # it needed SIGKILL (its clean-up, e.g. end probes, did not run)
    STUCK = "stuck"  # it survived SIGKILL (stuck in the kernel)


class Process(NamedTuple):
    """A process we started: its pid and its start time (so a reused pid is not it)."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> Process | None:
        """The process now running as ``pid``, or ``None`` if there is none."""
        started = start_time(pid)
        return None if started is None else cls(pid, started)

    def alive(self) -> bool:
        """True while this very process runs (not a zombie, not a successor)."""
        return self.pid > 0 and start_time(self.pid) == self.start_time

    def signal(self, signum: int, group: bool = False) -> bool:
        """Send ``signum`` if this very process still runs; False when it is gone.

        ``group``: to its whole process group too when it leads one (a loader
        started in its own session, with what it started: a wrapper's child,
        the ``-c`` command of stapbpf).
        """
        if not self.alive():
            return False
        try:
            if group and os.getpgid(self.pid) == self.pid:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def wait_gone(self, timeout: float) -> bool:
        """Poll until it is gone; False if it outlives ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        return True

    def terminate(self, grace: float, group: bool = False) -> Ending:
        """SIGTERM, then SIGKILL after ``grace`` seconds (bounded in all).

        Returns how it ended: already gone, exited on SIGTERM, killed, or
        still there (stuck in the kernel) after SIGKILL. ``group`` as for
        :meth:`signal`; what is left of the group after it goes is killed too.
        """
        if not self.signal(signal.SIGTERM, group):
            return Ending.GONE
        if self.wait_gone(grace):
            ending = Ending.TERMINATED
        else:
            self.signal(signal.SIGKILL, group)
            ending = Ending.KILLED if self.wait_gone(KILL_WAIT_SECONDS) else Ending.STUCK
        if group:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)  # stragglers of a group it led
        return ending


def stop_child(child: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float) -> Ending:
    """SIGTERM our child's process group, SIGKILL it after ``grace``; reap it.

    The child must have been started with ``start_new_session=True`` (or
    ``process_group=0``) so that what it started goes too.
    """
    if child.poll() is not None:
        return Ending.GONE
    _signal_group(child.pid, signal.SIGTERM)
    try:
        child.wait(timeout=grace)
        return Ending.TERMINATED
    except subprocess.TimeoutExpired:
        pass
    _signal_group(child.pid, signal.SIGKILL)
    try:
        child.wait(timeout=KILL_WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        return Ending.STUCK
    return Ending.KILLED


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:  # a setuid child left our group's reach: signal it alone
        with contextlib.suppress(OSError):
            os.kill(pid, signum)


class TimedOut(Exception):
    """:func:`run` gave up: the program outlived its time limit and was killed."""

    def __init__(self, argv: Sequence[str], timeout: float, output: str) -> None:
        super().__init__(f"{argv[0]} did not finish within {timeout:g}s")
        self.output = output


def run(
    argv: Sequence[str],
    timeout: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    grace: float = 2.0,
    interrupted: Callable[[], bool] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (stdin from /dev/null, output captured as text) within ``timeout`` seconds.

    The program runs in its own session; when time is up, or when
    ``interrupted`` (polled every 0.1 s) returns True,
    its whole group gets SIGTERM, then SIGKILL after ``grace``, and
    :class:`TimedOut` is raised (``.output`` holds what it printed).
    ``OSError`` (program missing, not executable) propagates.
    """
    child = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=None if env is None else dict(env),
        cwd=cwd,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            output, _ = child.communicate(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            return subprocess.CompletedProcess(list(argv), child.returncode, output, "")
        except subprocess.TimeoutExpired:
            if time.monotonic() < deadline and not (interrupted and interrupted()):
                continue
        stop_child(child, grace)
        output, _ = child.communicate()
        raise TimedOut(argv, timeout, output or "")
