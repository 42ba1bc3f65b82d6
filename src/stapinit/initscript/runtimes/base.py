"""The small interface every runtime offers to the service commands."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol

from stapinit.initscript.log import Log
from stapinit.initscript.options import StartOptions
from stapinit.initscript.status import StatusRecord


class RuntimeFailure(Exception):
    """Starting or stopping failed; str() is one line for the console."""


class Tools(NamedTuple):
    """Where the loaders are and how long to wait for them (from the settings)."""

    staprun: str
    stapbpf: str
    modules_list: Path
    log_file: Path
    stop_timeout: float


class Runtime(Protocol):
    """Start, watch and stop compiled scripts of one kind."""

    kind: str

    def start(self, name: str, module: Path, options: StartOptions, log: Log) -> StatusRecord:
        """Start the module; return what the status file must record."""
        ...

    def is_running(self, name: str, record: StatusRecord | None) -> bool:
        """True while the script runs."""
        ...

    def stop(self, name: str, record: StatusRecord | None, log: Log) -> None:
        """Stop the script and wait (bounded) until it is gone."""
        ...
