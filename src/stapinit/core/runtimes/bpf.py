"""The BPF runtime: ``stapbpf NAME.bo`` as a detached process (it has no detach mode).

Readiness comes from stapbpf itself, not a timer. stapbpf's ``main``
(stapbpf/stapbpf.cxx, the same in 4.8 and 5.x) loads the module, registers
every probe, runs the ``begin`` probes, and only then installs its
SIGINT/SIGTERM handler; it then starts its perf-event thread, enables the
kprobe group (``PERF_EVENT_IOC_ENABLE``) and blocks in ``pause()`` until the
script exits. So a stapbpf whose main thread sleeps in ``pause`` with SIGTERM
caught (``SigCgt``, proc(5)) has every probe attached and its ``begin``
probes done. A script whose ``begin`` calls ``exit()`` never pauses: it runs
its ``end`` probes and exits 0 — a completed one-shot run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

from stapinit.core import process
from stapinit.core.process import Ending, Process
from stapinit.core.runtime import (
    Instance,
    LoadOptions,
    LogSink,
    RuntimeFailure,
    RuntimeKind,
    State,
    load_command,
)
from stapinit.core.system import tool_environment

#: ``pause(2)``'s number in /proc/PID/syscall, where the architecture has one.
_PAUSE_SYSCALL = {"x86_64": "34"}


def is_ready(pid: int, machine: str) -> bool:
    """True once stapbpf ``pid`` has run ``begin`` and waits in ``pause()`` with probes live.

    Where ``pause`` has no syscall of its own (arm64 implements it with
    ``ppoll``), a main thread asleep with SIGTERM caught is taken instead.
    """
    if not process.catches_signal(pid, signal.SIGTERM):
        return False
    pause = _PAUSE_SYSCALL.get(machine)
    if pause is not None:
        try:
            with open(f"/proc/{pid}/syscall", encoding="ascii", errors="replace") as handle:
                return handle.read(64).split(" ", 1)[0] == pause
        except OSError:
            return False
    return process.status_fields(pid).get("State", "").startswith("S")


class BpfRuntime:
    """Runs ``NAME.bo`` under stapbpf in its own session."""

    kind: RuntimeKind = "bpf"

    def __init__(self, stapbpf: str, start_timeout: float, stop_timeout: float) -> None:
        self.stapbpf = stapbpf
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._machine = os.uname().machine

    def launch(self, name: str, module: str, options: LoadOptions, output: int) -> Instance:
        """Start stapbpf detached (own session, stdin /dev/null, output to ``output``)."""
        argv = load_command("bpf", self.stapbpf, module, options)
        try:
            child = subprocess.Popen(
                argv,
                env=tool_environment(os.environ, os.geteuid()),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
            )
        except OSError as error:
            raise RuntimeFailure(f"cannot run {argv[0]}: {error.strerror}") from None
        self._children[child.pid] = child
        started = process.start_time(child.pid) or 0
        return Instance(name, "bpf", child.pid, started, module, "starting")

    def wait_ready(self, instance: Instance, interrupted: Callable[[], bool]) -> Instance:
        """Poll until ready, exited or ``start_timeout``; a failure stops it first."""
        child = self._children.pop(instance.pid, None)
        deadline = time.monotonic() + self.start_timeout
        delay = 0.0005
        while True:
            status = child.poll() if child is not None else None
            if status is not None:
                if status == 0:
                    return instance._replace(phase="exited", exit_status=0)
                reason = f"exit status {status}" if status > 0 else f"killed by signal {-status}"
                raise RuntimeFailure(f"stapbpf failed ({reason})")
            if child is None and not Process(instance.pid, instance.start_time).alive():
                raise RuntimeFailure("stapbpf exited while loading")
            if is_ready(instance.pid, self._machine):
                return instance._replace(phase="ready")
            if interrupted() or time.monotonic() >= deadline:
                why = "interrupted" if interrupted() else f"not ready after {self.start_timeout:g}s"
                Process(instance.pid, instance.start_time).terminate(self.stop_timeout, group=True)
                if child is not None:
                    child.poll()
                raise RuntimeFailure(f"stapbpf {why}; stopped it")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def state(self, name: str, instance: Instance | None) -> State:
        """Running while the very process we started, on our module, is alive."""
        if instance is None:
            return State.STOPPED
        if instance.phase == "exited":
            return State.EXITED
        # pid and start time identify the process; a ready one must also still
        # run our module (a starting one may be between a wrapper and its exec).
        if Process(instance.pid, instance.start_time).alive() and (
            instance.phase == "starting" or instance.module in process.command_line(instance.pid)
        ):
            # A start killed while waiting leaves "starting": look again.
            ready = instance.phase == "ready" or is_ready(instance.pid, self._machine)
            return State.RUNNING if ready else State.STARTING
        return State.DEAD

    def stop(self, name: str, instance: Instance | None, log: LogSink) -> Ending:
        """SIGTERM (its ``end`` probes run), SIGKILL after ``stop_timeout``."""
        if instance is None or self.state(name, instance) not in (State.RUNNING, State.STARTING):
            return Ending.GONE
        log.info(f"Sending SIGTERM to {name} (pid {instance.pid})")
        ending = Process(instance.pid, instance.start_time).terminate(self.stop_timeout, group=True)
        if ending is Ending.STUCK:
            raise RuntimeFailure(f"stapbpf (pid {instance.pid}) did not exit, even after SIGKILL")
        if ending is Ending.KILLED:
            log.warning(
                f"{name} did not stop within {self.stop_timeout:g}s of SIGTERM and was killed;"
                " its end probes did not run"
            )
        return ending


def find_running(modules: dict[str, str], uid: int | None = None) -> dict[str, Process]:
    """Which of ``modules`` (name -> module path) a stapbpf of ``uid`` (default: ours) runs.

    A start killed between spawning stapbpf and recording it leaves such a
    process; ``start`` adopts it and ``stop`` stops it, so none is ever lost.
    """
    owner = os.geteuid() if uid is None else uid
    found: dict[str, Process] = {}
    by_path = {path: name for name, path in modules.items()}
    for pid in process.pids():
        argv = process.command_line(pid)
        if not argv or argv[-1] not in by_path or process.owner(pid) != owner:
            continue
        running = Process.of(pid)
        if running is not None and "stapbpf" in os.path.basename(argv[0]) + " ".join(argv[:-1]):
            found[by_path[argv[-1]]] = running
    return found
