"""The BPF runtime: ``stapbpf`` as a detached process (it has no detach mode)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from stapinit.core import process as processes
from stapinit.initscript.log import Log
from stapinit.initscript.options import StartOptions
from stapinit.initscript.runtimes.base import RuntimeFailure, Tools
from stapinit.initscript.status import StatusRecord

# A program that fails to load exits within this; one that lives longer is up.
LOAD_GRACE_SECONDS = 0.3


def start_command(stapbpf: str, module: Path, options: StartOptions) -> list[str]:
    """``stapbpf [-o FILE] [-c CMD] [-x PID] NAME.bo``."""
    argv = [stapbpf]
    if options.output_file is not None:
        argv += ["-o", options.output_file]
    if options.command:
        argv += ["-c", options.command]
    if options.target_pid:
        argv += ["-x", options.target_pid]
    return [*argv, str(module)]


class BpfRuntime:
    """Runs ``NAME.bo`` under stapbpf in its own session, output to the log."""

    kind = "bpf"

    def __init__(self, tools: Tools) -> None:
        self.tools = tools

    def start(self, name: str, module: Path, options: StartOptions, log: Log) -> StatusRecord:
        """Start stapbpf detached and make sure it survives loading."""
        argv = start_command(self.tools.stapbpf, module, options)
        log.exec(argv)
        try:
            output = self.tools.log_file.open("ab")
        except OSError as error:
            raise RuntimeFailure(f"cannot write {self.tools.log_file}: {error.strerror}") from None
        with output:
            offset = output.seek(0, os.SEEK_END)
            try:
                child = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    start_new_session=True,
                )
            except OSError as error:
                raise RuntimeFailure(f"cannot run {argv[0]}: {error.strerror}") from None
        started = processes.start_time(child.pid) or 0
        deadline = time.monotonic() + LOAD_GRACE_SECONDS
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.02)
        if child.poll() is not None:
            message = self._new_log_text(offset).strip().splitlines()
            reason = message[-1] if message else f"exit status {child.returncode}"
            if child.returncode == 0:
                raise RuntimeFailure(f"stapbpf exited at once (status 0): {reason}")
            raise RuntimeFailure(f"stapbpf failed: {reason}")
        return StatusRecord(name, self.kind, child.pid, started, str(module))

    def _new_log_text(self, offset: int) -> str:
        try:
            with self.tools.log_file.open("rb") as handle:
                handle.seek(offset)
                return handle.read(64 * 1024).decode(errors="replace")
        except OSError:
            return ""

    def is_running(self, name: str, record: StatusRecord | None) -> bool:
        """Running while the very process we started, on our module, is alive."""
        return (
            record is not None
            and processes.Process(record.pid, record.start_time).alive()
            and record.module in processes.command_line(record.pid)
        )

    def stop(self, name: str, record: StatusRecord | None, log: Log) -> None:
        """SIGTERM (its end probes run), SIGKILL after ``STOP_TIMEOUT``."""
        if record is None or not self.is_running(name, record):
            return
        log.info(f"Sending SIGTERM to {name} (pid {record.pid})")
        if (
            processes.Process(record.pid, record.start_time).terminate(self.tools.stop_timeout)
            is processes.Ending.STUCK
        ):
            raise RuntimeFailure(f"stapbpf (pid {record.pid}) did not exit, even after SIGKILL")
