"""The kernel-module runtime: ``staprun`` in flight-recorder mode (spec §4.2.1).

Readiness is staprun's own: ``staprun -L`` returns once the module is loaded
and its probes registered; ``staprun -D`` returns once its daemon is up and
prints the daemon's pid (staprun(8)). A module is running while its name is
listed in ``/proc/modules`` (proc(5)).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from stapinit.core import process
from stapinit.core.process import Ending, Process, TimedOut
from stapinit.core.runtime import (
    Instance,
    LoadOptions,
    LogSink,
    RuntimeFailure,
    RuntimeKind,
    State,
    load_command,
)
from stapinit.core.safeio import read_regular
from stapinit.core.system import tool_environment


def loaded_modules(modules_list: Path) -> set[str]:
    """Names of the loaded modules (first column of ``modules_list``, e.g. /proc/modules)."""
    try:
        # Never blocks on a FIFO or follows a link planted in its place.
        text = read_regular(modules_list, 1 << 22).decode("utf-8", errors="replace")
    except OSError:
        return set()
    return {line.split(maxsplit=1)[0] for line in text.splitlines() if line.strip()}


class KernelModuleRuntime:
    """Loads ``NAME.ko`` with staprun; running means listed in ``modules_list``."""

    kind: RuntimeKind = "kmod"

    def __init__(
        self,
        staprun: str,
        modules_list: Path,
        load_timeout: float,
        stop_timeout: float,
        log: LogSink,
    ) -> None:
        self.staprun = staprun
        self.modules_list = modules_list
        self.load_timeout = load_timeout
        self.stop_timeout = stop_timeout
        self.log = log
        self._pending: dict[str, tuple[list[str], LoadOptions]] = {}

    def _run(self, argv: list[str], interrupted: Callable[[], bool] | None = None) -> str:
        self.log.exec(argv)
        try:
            done = process.run(
                argv,
                self.load_timeout,
                env=tool_environment(os.environ, os.geteuid()),
                interrupted=interrupted,
            )
        except OSError as error:
            raise RuntimeFailure(f"cannot run {argv[0]}: {error.strerror}") from None
        except TimedOut as error:
            self.log.output(argv[0], error.output)
            what = "interrupted" if interrupted and interrupted() else str(error)
            raise RuntimeFailure(f"{Path(argv[0]).name} {what}; stopped it") from None
        self.log.output(argv[0], done.stdout)
        if done.returncode != 0:
            last = (done.stdout.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise RuntimeFailure(f"{Path(argv[0]).name} failed: {last}")
        return done.stdout

    def launch(self, name: str, module: str, options: LoadOptions, output: int) -> Instance:
        """Nothing runs yet: the record of a ``starting`` module comes first, then staprun."""
        self._pending[name] = (load_command("kmod", self.staprun, module, options), options)
        return Instance(name, "kmod", 0, 0, module, "starting")

    def wait_ready(self, instance: Instance, interrupted: Callable[[], bool]) -> Instance:
        """Run ``staprun -L``/``-D`` (bounded by ``load_timeout``); check the module is listed."""
        argv, options = self._pending.pop(instance.name)
        stdout = self._run(argv, interrupted)
        pid, started = 0, 0
        if options.output_file is not None:
            words = stdout.split()
            if not words or not words[-1].isdigit():
                raise RuntimeFailure("staprun -D did not print the daemon's pid")
            pid = int(words[-1])
            started = process.start_time(pid) or 0
        if instance.name not in loaded_modules(self.modules_list):
            raise RuntimeFailure(
                f"module {instance.name} is not in {self.modules_list} after loading"
            )
        return instance._replace(pid=pid, start_time=started, phase="ready")

    def state(self, name: str, instance: Instance | None) -> State:
        """Loaded with our record: running; loaded without one: not ours (foreign)."""
        if name in loaded_modules(self.modules_list):
            return State.FOREIGN if instance is None else State.RUNNING
        return State.STOPPED if instance is None else State.DEAD

    def stop(self, name: str, instance: Instance | None, log: LogSink) -> Ending:
        """SIGTERM the daemon, or ``staprun -d`` a detached module, then wait until unloaded."""
        ending = Ending.GONE
        if instance and instance.pid and Process(instance.pid, instance.start_time).alive():
            log.info(f"Sending SIGTERM to {name} daemon (pid {instance.pid})")
            ending = Process(instance.pid, instance.start_time).terminate(self.stop_timeout)
        if name in loaded_modules(self.modules_list):
            self._run([self.staprun, "-d", name])
            ending = Ending.TERMINATED if ending is Ending.GONE else ending
        deadline = time.monotonic() + self.stop_timeout
        while name in loaded_modules(self.modules_list):
            if time.monotonic() >= deadline:
                raise RuntimeFailure(f"module {name} is still loaded after {self.stop_timeout:g}s")
            time.sleep(0.05)
        return ending
