"""The kernel-module runtime: ``staprun`` in flight-recorder mode (spec §4.2.1)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from stapinit.core import process as processes
from stapinit.initscript.log import Log
from stapinit.initscript.options import StartOptions
from stapinit.initscript.runtimes.base import RuntimeFailure, Tools
from stapinit.initscript.status import StatusRecord


def start_command(staprun: str, module: Path, options: StartOptions) -> list[str]:
    """``staprun -L`` (recorder in memory) or ``staprun -D -o FILE`` (recorder on file)."""
    argv = [staprun]
    if options.output_file is None:
        argv.append("-L")
    else:
        argv += ["-D", "-o", options.output_file]
        if options.file_switch:
            argv += ["-S", options.file_switch]
    if options.buffer_mb:
        argv += ["-b", options.buffer_mb]
    if options.command:
        argv += ["-c", options.command]
    if options.target_pid:
        argv += ["-x", options.target_pid]
    return [*argv, str(module)]


def loaded_modules(modules_list: Path) -> set[str]:
    """Names of the loaded modules (first column of /proc/modules)."""
    try:
        text = modules_list.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return set()
    return {line.split(maxsplit=1)[0] for line in text.splitlines() if line.strip()}


class KernelModuleRuntime:
    """Loads ``NAME.ko`` with staprun; running means listed in ``MODULES_LIST``."""

    kind = "kmod"

    def __init__(self, tools: Tools) -> None:
        self.tools = tools

    def _run(self, argv: list[str], log: Log) -> subprocess.CompletedProcess[str]:
        log.exec(argv)
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
            )
        except OSError as error:
            raise RuntimeFailure(f"cannot run {argv[0]}: {error.strerror}") from None
        except subprocess.TimeoutExpired:
            raise RuntimeFailure(f"{argv[0]} did not finish within 120s") from None
        log.output(argv[0], done.stdout + done.stderr)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise RuntimeFailure(f"{Path(argv[0]).name} failed: {last}")
        return done

    def start(self, name: str, module: Path, options: StartOptions, log: Log) -> StatusRecord:
        """Load the module detached, or as a daemon writing to ``-o FILE``."""
        done = self._run(start_command(self.tools.staprun, module, options), log)
        pid, started = 0, 0
        if options.output_file is not None:
            words = done.stdout.split()
            if not words or not words[-1].isdigit():
                raise RuntimeFailure("staprun -D did not print the daemon's pid")
            pid = int(words[-1])
            started = processes.start_time(pid) or 0
        if name not in loaded_modules(self.tools.modules_list):
            raise RuntimeFailure(f"module {name} is not in {self.tools.modules_list} after loading")
        return StatusRecord(name, self.kind, pid, started, str(module))

    def is_running(self, name: str, record: StatusRecord | None) -> bool:
        """A module is running while it is loaded."""
        return name in loaded_modules(self.tools.modules_list)

    def stop(self, name: str, record: StatusRecord | None, log: Log) -> None:
        """SIGTERM the daemon, or ``staprun -d`` a detached module, then wait."""
        if record and record.pid and processes.Process(record.pid, record.start_time).alive():
            log.info(f"Sending SIGTERM to {name} daemon (pid {record.pid})")
            processes.Process(record.pid, record.start_time).terminate(self.tools.stop_timeout)
        if name in loaded_modules(self.tools.modules_list):
            self._run([self.tools.staprun, "-d", name], log)
        deadline = time.monotonic() + self.tools.stop_timeout
        while name in loaded_modules(self.tools.modules_list):
            if time.monotonic() >= deadline:
                raise RuntimeFailure(
                    f"module {name} is still loaded after {self.tools.stop_timeout:g}s"
                )
            time.sleep(0.05)
