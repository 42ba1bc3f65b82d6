"""The runtime contract: what a compiled script is, how it is loaded, what state it is in.

Two runtimes exist (stap(1) ``--runtime``): kernel modules (``NAME.ko``, loaded
by ``staprun``) and BPF programs (``NAME.bo``, run by ``stapbpf``). Every
program that names, builds a command line for, or reports on a compiled
script takes the facts from here: the boot-time service, the loader, the
client and the compile server.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal, NamedTuple, Protocol

from stapinit.core.errors import StapinitError
from stapinit.core.process import Ending

RuntimeKind = Literal["kmod", "bpf"]
RUNTIME_KINDS: Final[tuple[RuntimeKind, ...]] = ("kmod", "bpf")

#: File suffix of a compiled module, per runtime.
MODULE_SUFFIX: Final[Mapping[RuntimeKind, str]] = {"kmod": ".ko", "bpf": ".bo"}
#: The runtime of a module file, by suffix.
KIND_OF_SUFFIX: Final[Mapping[str, RuntimeKind]] = {".ko": "kmod", ".bo": "bpf"}


def parse_kind(text: str) -> RuntimeKind:
    """``"kmod"`` or ``"bpf"``; anything else raises :class:`ValueError` (never a default)."""
    for kind in RUNTIME_KINDS:
        if text == kind:
            return kind
    raise ValueError(f"{text!r} is not a runtime (kmod or bpf)")


def kind_of_module(file_name: str) -> RuntimeKind | None:
    """The runtime of ``NAME.ko`` / ``NAME.bo``; ``None`` for any other file name."""
    dot = file_name.rfind(".")
    return KIND_OF_SUFFIX.get(file_name[dot:]) if dot > 0 else None


class LoadOptions(NamedTuple):
    """What the loader of a module takes at start (spec §4.2.1's start-time options)."""

    output_file: str | None = None  # -o FILE
    file_switch: str | None = None  # -S size[,N] (staprun only)
    buffer_mb: str | None = None  # stap's -s N, staprun's -b N
    command: str | None = None  # -c CMD
    target_pid: str | None = None  # -x PID


def load_command(
    kind: RuntimeKind, tool: str, module: str, options: LoadOptions | None = None
) -> list[str]:
    """The command line that runs ``module`` with ``tool`` (``staprun`` or ``stapbpf``).

    Kernel modules always run in flight-recorder mode (spec §4.2.1), as
    upstream's initscript does: ``staprun -L`` (recorder in memory, returns once
    loaded) or ``staprun -D -o FILE [-S size[,N]]`` (a daemon writing FILE,
    returns once it is up). ``stapbpf`` has neither mode (stapbpf(8)): it runs
    in the foreground, ``stapbpf [-o FILE] [-c CMD] [-x PID] NAME.bo``.
    """
    options = options or LoadOptions()
    argv = [tool]
    if kind == "kmod":
        if options.output_file is None:
            argv.append("-L")
        else:
            argv += ["-D", "-o", options.output_file]
            if options.file_switch:
                argv += ["-S", options.file_switch]
        if options.buffer_mb:
            argv += ["-b", options.buffer_mb]
    elif options.output_file is not None:
        argv += ["-o", options.output_file]
    if options.command:
        argv += ["-c", options.command]
    if options.target_pid:
        argv += ["-x", options.target_pid]
    return [*argv, module]


def foreground_command(
    kind: RuntimeKind, tool: str, module: str, output_file: str | None
) -> list[str]:
    """Run ``module`` attached, until it exits or gets SIGTERM/SIGINT (the client and the loader).

    ``staprun MODULE`` stays in the foreground and unloads the module when it
    ends (staprun(8)); ``stapbpf`` always does.
    """
    argv = [tool]
    if output_file is not None:
        argv += ["-o", output_file]
    return [*argv, module]


class State(enum.Enum):
    """What a script is doing, as ``status`` reports it (spec §2.2.4, LSB wording)."""

    RUNNING = "running"  # started by us and running
    STARTING = "starting"  # started by us; not yet ready (its begin probes have not run)
    EXITED = "exited"  # started by us, ran, and ended by itself with status 0 (a one-shot)
    DEAD = "dead"  # our status record exists but the script is gone
    FOREIGN = "foreign"  # loaded or running, but not by us (no status record)
    STOPPED = "stopped"  # not running, no record


class LogSink(Protocol):
    """Where a runtime reports what it does (the service's log implements it)."""

    def info(self, message: str) -> None:
        """A message for the log only."""

    def warning(self, message: str) -> None:
        """Something the admin should see."""

    def exec(self, argv: Sequence[str]) -> None:
        """A command about to run."""

    def output(self, label: str, text: str) -> None:
        """A tool's output, in full."""


Phase = Literal["starting", "ready", "exited"]


class Instance(NamedTuple):
    """One started script, as its status record keeps it.

    ``pid`` is 0 for a kernel module loaded without a daemon (``staprun -L``);
    ``start_time`` (clock ticks since boot, proc(5)) tells that pid from a
    later process that reuses it. ``phase`` is ``starting`` from the moment the
    process exists until it is ready, so that a start killed half-way leaves a
    record that ``status`` and ``stop`` find; ``exited`` is a script that ran
    and ended by itself with ``exit_status`` (a one-shot script).
    """

    name: str
    kind: RuntimeKind
    pid: int
    start_time: int
    module: str
    phase: Phase = "ready"
    exit_status: int | None = None


class RuntimeFailure(StapinitError):
    """Starting or stopping a script failed; ``str()`` is one line for the console."""


class Runtime(Protocol):
    """Start, watch and stop compiled scripts of one kind.

    ``launch`` returns as soon as the script's process exists (or, for a
    kernel module, right away) with a ``starting`` instance the caller records
    at once; ``wait_ready`` then blocks (bounded) until the script's probes are
    live, and returns the ``ready`` (or ``exited``) instance.
    """

    kind: RuntimeKind

    def launch(self, name: str, module: str, options: LoadOptions, output: int) -> Instance:
        """Start loading ``module``; ``output`` is the file descriptor for its output."""
        ...

    def wait_ready(self, instance: Instance, interrupted: Callable[[], bool]) -> Instance:
        """Wait until the script is live; else stop it and raise :class:`RuntimeFailure`."""
        ...

    def state(self, name: str, instance: Instance | None) -> State:
        """What ``name`` is doing, given its record (``None`` when it has none)."""
        ...

    def stop(self, name: str, instance: Instance | None, log: LogSink) -> Ending:
        """Stop it, waiting (bounded) until it is gone; :class:`RuntimeFailure` if it stays."""
        ...
