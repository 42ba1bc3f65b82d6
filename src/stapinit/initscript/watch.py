"""``systemtap-service watch``: start the scripts, then tell systemd the truth about them.

systemtap.service runs this as a ``Type=notify`` service. It starts the
scripts as ``start`` does and sends ``READY=1`` only once every script is up,
so nothing ordered after the unit starts before the probes are in place. Then
it stays, reports the scripts with ``STATUS=`` (``systemctl status`` shows it)
and follows them:

* a script whose status file is gone was stopped by ``systemtap-service stop``
  (or ``reload``): not a failure;
* a script whose process exited with status 0 finished (a script that calls
  ``exit()``): not a failure; its record says so, as ``start`` records a
  script that exits at once (``status``: "ran and exited (status 0)");
* any other script that is no longer running died: the watcher exits 1, so the
  unit fails and ``systemctl status`` and ``service systemtap status`` (which
  runs it under systemd) say so, with non-zero exit codes;
* when no script is left, it exits 0 and the unit becomes inactive.

A script that seems gone is judged again under the service lock, which a
``stop`` holds until it has removed the status files, so a stop in progress is
never taken for a death. Only the scripts this process started are its
children, so only their exit statuses are known; one started by another
``systemtap-service start`` that exits counts as dead.

The watcher waits on pidfds (Linux >= 5.3), SIGCHLD and SIGTERM, and otherwise
looks again every :data:`SCAN_SECONDS` (for kernel modules, which have no
process, and for status files removed by ``stop``): it uses no CPU in between.

sd_notify (systemd's ``sd_notify(3)`` protocol): one datagram of
``KEY=value`` lines to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``; a
leading ``@`` means Linux's abstract namespace.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import NamedTuple

from stapinit.core.lsb import EXIT_FAILED, EXIT_OK
from stapinit.core.runtime import State
from stapinit.initscript import status
from stapinit.initscript.commands import Initscript, Request
from stapinit.initscript.lock import CommandLock, LockError
from stapinit.initscript.log import Log, LogError

#: Seconds between two looks at the status files when nothing wakes us.
SCAN_SECONDS = 2.0


class Ended(NamedTuple):
    """How a child process ended, from its wait status."""

    code: int | None  # its exit status, when it exited
    signal: int | None  # the signal that killed it, when one did

    @classmethod
    def from_wait_status(cls, wait_status: int) -> Ended:
        """Decode a ``waitpid`` status."""
        if os.WIFSIGNALED(wait_status):
            return cls(None, os.WTERMSIG(wait_status))
        return cls(os.waitstatus_to_exitcode(wait_status), None)

    def describe(self) -> str:
        """``exit status N`` or ``killed by SIGNAME``."""
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exit status {self.code}"


class Observation(NamedTuple):
    """One script's state at one look."""

    name: str
    state: State  # its runtime's view of its record; STOPPED once the record is gone
    pid: int  # from the status record; 0 for a detached kernel module
    ended: Ended | None  # how its process ended, when it was our child and was reaped


class Verdict(NamedTuple):
    """What to tell systemd, and whether to go on watching."""

    status: str  # the STATUS= text
    exit_code: int | None  # None: keep watching
    finished: tuple[str, ...]  # scripts that ended with status 0: record them as exited
    deaths: tuple[str, ...]  # one line per script that died, for the log


def judge(observations: Iterable[Observation]) -> Verdict:
    """The verdict on one look at the scripts (pure; see the module docstring for the rules)."""
    running: list[Observation] = []
    finished: list[str] = []
    deaths: list[str] = []
    for seen in sorted(observations):
        if seen.state in (State.RUNNING, State.STARTING):
            running.append(seen)
        elif seen.state is not State.DEAD:
            continue  # stopped by systemtap-service stop, or ran and exited at start
        elif seen.ended is not None and seen.ended.code == 0:
            finished.append(seen.name)
        else:
            how = seen.ended.describe() if seen.ended is not None else "no longer running"
            deaths.append(f"{seen.name} died ({how})")
    if deaths:
        return Verdict("; ".join(deaths), EXIT_FAILED, tuple(finished), tuple(deaths))
    if not running:
        return Verdict("no scripts running", EXIT_OK, tuple(finished), ())
    names = ", ".join(f"{s.name} (pid {s.pid})" if s.pid else s.name for s in running)
    noun = "script" if len(running) == 1 else "scripts"
    return Verdict(f"{len(running)} {noun} running: {names}", None, tuple(finished), ())


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The socket address of ``$NOTIFY_SOCKET``, abstract ones starting with NUL; else None."""
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        return "\0" + address[1:]
    return address if address.startswith("/") else None


def sd_notify(address: str | None, message: str) -> None:
    """Send ``message`` (``KEY=value`` lines) to systemd; nothing without an address.

    Raises OSError when the socket cannot be reached.
    """
    if address is None:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), address)


def reap(endings: dict[int, Ended]) -> None:
    """Collect every exited child of ours (the stapbpf processes ``start`` ran)."""
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        endings[pid] = Ended.from_wait_status(wait_status)


def observe(initscript: Initscript, endings: Mapping[int, Ended]) -> list[Observation]:
    """Look at every script with a status record of ours."""
    stat_path = initscript.settings.stat_path
    seen: list[Observation] = []
    for name in status.recorded_names(stat_path):
        record = status.read(stat_path, name)
        state = initscript.runtimes[record.kind].state(name, record) if record else State.STOPPED
        pid = record.pid if record else 0
        ended = endings.get(pid) if pid and state is State.DEAD else None
        seen.append(Observation(name, state, pid, ended))
    return seen


def wait(pids: Sequence[int], wakeup: int, timeout: float) -> None:
    """Sleep until one of ``pids`` exits, a signal arrives or ``timeout`` seconds pass."""
    handles: list[int] = []
    try:
        for pid in pids:
            try:
                handles.append(os.pidfd_open(pid))
            except ProcessLookupError:
                return  # already gone: look again now
        select.select([wakeup, *handles], [], [], timeout)
        try:
            while os.read(wakeup, 64):
                pass
        except BlockingIOError:
            pass
    finally:
        for handle in handles:
            os.close(handle)


def watch(
    initscript: Initscript,
    request: Request,
    start_lock: Callable[[], AbstractContextManager[object]],
) -> int:
    """Start the scripts under ``start_lock``, report readiness, then follow them.

    See the module docstring. Returns 0 when every script was stopped or
    finished (or on SIGTERM), 1 when one died, or ``start``'s failure code.
    Messages go to $NOTIFY_SOCKET, if set.
    """
    # The scripts must not inherit systemd's socket: only this process speaks for them.
    address = notify_address(os.environ)
    os.environ.pop("NOTIFY_SOCKET", None)

    def tell(message: str) -> None:
        try:
            sd_notify(address, message)
        except OSError as error:
            with _log_open(initscript.log) as log:
                log.warning(f"cannot notify systemd: {error.strerror or error}")

    with start_lock():
        code = initscript.start(request)
    sys.stdout.flush()
    if code != EXIT_OK:
        return code
    # From now on the log is opened for each message: logrotate may move it meanwhile.
    initscript.log.close()
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous_wakeup = signal.set_wakeup_fd(write_end)
    # A handler (not the default) so that a child's exit writes to the wakeup pipe.
    previous_chld = signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    endings: dict[int, Ended] = {}
    try:
        verdict, pids = _look(initscript, endings)
        tell(f"READY=1\nSTATUS={verdict.status}")
        shown = verdict.status
        while verdict.exit_code is None and not initscript.interrupted:
            wait(pids, read_end, SCAN_SECONDS)
            verdict, pids = _look(initscript, endings)
            if verdict.status != shown:
                tell(f"STATUS={verdict.status}")
                shown = verdict.status
        return EXIT_OK if verdict.exit_code is None else verdict.exit_code
    finally:
        signal.signal(signal.SIGCHLD, previous_chld)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(read_end)
        os.close(write_end)


def _look(initscript: Initscript, endings: dict[int, Ended]) -> tuple[Verdict, list[int]]:
    """Judge the scripts; anything but "all running" is judged again under the lock.

    Returns the verdict and the pids to wait for.
    """
    reap(endings)
    observations = observe(initscript, endings)
    verdict = judge(observations)
    if verdict.exit_code is not None or verdict.finished:
        settings = initscript.settings
        lock = CommandLock(
            settings.stat_path, settings.lock_timeout, "watch", initscript.is_interrupted
        )
        try:
            with lock:
                reap(endings)
                observations = observe(initscript, endings)
                verdict = judge(observations)
                for seen in observations:
                    record = status.read(settings.stat_path, seen.name)
                    if seen.name in verdict.finished and record is not None:
                        # As start records a one-shot script that exits at once.
                        status.write(
                            settings.stat_path, record._replace(phase="exited", exit_status=0)
                        )
        except LockError as error:
            # A command holds the lock too long: keep watching, decide next time.
            with _log_open(initscript.log) as log:
                log.warning(str(error))
            return verdict._replace(exit_code=None, finished=(), deaths=()), []
        _report(initscript, verdict)
    # Exit statuses of processes no status record names any more are spent.
    recorded = {seen.pid for seen in observations}
    for pid in [pid for pid in endings if pid not in recorded]:
        del endings[pid]
    running = (State.RUNNING, State.STARTING)
    return verdict, [seen.pid for seen in observations if seen.state in running and seen.pid]


@contextmanager
def _log_open(log: Log) -> Iterator[Log]:
    """The log, open for a few messages (errors reach the console even if it cannot open)."""
    with suppress(LogError):
        log.open()
    try:
        yield log
    finally:
        log.close()


def _report(initscript: Initscript, verdict: Verdict) -> None:
    """Log the scripts that finished or died."""
    with _log_open(initscript.log) as log:
        for name in verdict.finished:
            log.report(f"{name} ran and exited (status 0)")
        for line in verdict.deaths:
            log.error(line)
