"""The service commands: compile, cleanup, start, stop, restart, status (spec §2.2).

Scripts start by dependency level: the scripts of a level start together
(at most ``START_JOBS`` at once) and the next level starts when they are all
ready, so a script never starts before what it requires is live. Each
script's status record is written the moment its process exists, so a start
killed at any moment leaves nothing that ``status`` and ``stop`` cannot find.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

from stapinit.core.errors import StapinitError
from stapinit.core.lsb import (
    EXIT_FAILED,
    EXIT_NOT_CONFIGURED,
    EXIT_NOT_INSTALLED,
    EXIT_OK,
    STATUS_DEAD_WITH_PIDFILE,
    STATUS_NOT_RUNNING,
    STATUS_UNKNOWN,
)
from stapinit.core.names import is_valid_name
from stapinit.core.parallel import parallel_map
from stapinit.core.process import Ending, Process
from stapinit.core.runtime import Instance, Phase, Runtime, RuntimeFailure, RuntimeKind, State
from stapinit.core.runtimes import bpf
from stapinit.core.runtimes.bpf import BpfRuntime
from stapinit.core.runtimes.kmod import KernelModuleRuntime
from stapinit.initscript import cache, deps, status
from stapinit.initscript.cache import KernelIdentity, running_kernel, target_kernel
from stapinit.initscript.compiler import CompileResult, compile_many, wanted_record
from stapinit.initscript.log import Log
from stapinit.initscript.scripts import (
    Script,
    ScriptError,
    cache_dir,
    find_scripts,
    requirements_map,
)
from stapinit.initscript.settings import Settings
from stapinit.initscript.status_report import ScriptStatus

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OUR_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[\d+\] ")


class CommandError(StapinitError):
    """A command cannot go on; carries the exit code and a one-line message."""


class Request(NamedTuple):
    """What the command line asked for, beyond the command itself."""

    scripts: tuple[str, ...] = ()
    release: str | None = None
    recursive: bool = False
    assume_yes: bool = False
    json: bool = False
    archive: Path | None = None  # pack: the file to write (-o); unpack: the file to read
    all_kernels: bool = False  # compile: every release with a build tree (--all-kernels)
    releases: tuple[str, ...] = ()  # pack: every -r given (it may repeat)


Confirm = Callable[[str], bool]


class Initscript:
    """The scripts of one configuration and the commands that act on them.

    Locking and root checks are the command line's (see ``cli.COMMANDS``);
    these methods assume they were done.
    """

    def __init__(self, settings: Settings, log: Log, confirm: Confirm) -> None:
        self.settings = settings
        self.log = log
        self.confirm = confirm
        # Set by the CLI's SIGTERM/SIGINT handler: waits end early, and no
        # further script starts, so a signal never leaves a loader unrecorded.
        self.interrupted = False
        self.runtimes: dict[RuntimeKind, Runtime] = {
            "bpf": BpfRuntime(settings.stapbpf, settings.start_timeout, settings.stop_timeout),
            "kmod": KernelModuleRuntime(
                settings.staprun,
                settings.modules_list,
                settings.load_timeout,
                settings.stop_timeout,
                log,
            ),
        }

    def is_interrupted(self) -> bool:
        """True once a signal asked us to stop (polled by every bounded wait)."""
        return self.interrupted

    def check_interrupted(self) -> None:
        """Give up between two steps if a signal asked us to."""
        if self.interrupted:
            raise CommandError("interrupted; the remaining scripts were left as they were", 130)

    # -- selecting scripts -------------------------------------------------

    def scripts(self, release: str) -> dict[str, Script]:
        """Every script, or a clear error for a broken one."""
        try:
            return find_scripts(self.settings, release, self.log.warning)
        except ScriptError as error:
            raise CommandError(str(error), EXIT_NOT_CONFIGURED) from None

    def scripts_for_shutdown(self, release: str) -> dict[str, Script]:
        """Every script that can be read, plus every one with a status record.

        ``stop`` and ``status`` must work whatever else is broken: a script
        whose options or requirements cannot be read, or a missing
        ``SCRIPT_PATH``, costs a warning; the status records say what runs.
        """
        try:
            scripts = find_scripts(self.settings, release, self.log.warning, lenient=True)
        except ScriptError as error:
            self.log.warning(f"{error}; going by the status records alone")
            scripts = {}
        for name in status.recorded_names(self.settings.stat_path):
            if name not in scripts:
                record = status.read(self.settings.stat_path, name)
                kind: RuntimeKind = record.kind if record else "kmod"
                scripts[name] = Script(name, None, (), (), kind)
        return scripts

    def select(
        self, request: Request, scripts: dict[str, Script], default: Sequence[str] = ()
    ) -> tuple[list[str], dict[str, str]]:
        """The scripts a command acts on, in start order, and those that cannot start.

        Named scripts must exist (exit 5). ``DEFAULT_START`` names that are
        no scripts are skipped with an error, as upstream does since its
        bug 1218: the rest start, and ``PASSALL`` decides the exit code.
        """
        named = list(request.scripts)
        for name in named:
            if name not in scripts:
                raise CommandError(f"no such script: {name}", EXIT_NOT_INSTALLED)
        requires = requirements_map(scripts)
        missing: dict[str, str] = {}
        if named:
            chosen = set(named)
            follow = request.recursive or self.settings.recursive
        else:
            chosen = set(default) if default else set(scripts)
            for name in sorted(chosen - set(scripts)):
                what = "not a script" if is_valid_name(name) else "not a valid script name"
                missing[name] = f"DEFAULT_START names {name!r}, which is {what}"
                self.log.error(missing[name])
            chosen &= set(scripts)
            follow = True
        if follow:
            chosen = deps.with_requirements(chosen, requires)
        try:
            return deps.start_order(chosen, requires), missing
        except deps.DependencyError as error:
            raise CommandError(str(error), EXIT_NOT_CONFIGURED) from None

    # -- compile and cleanup -----------------------------------------------

    def stale_scripts(
        self, scripts: Sequence[Script], kernel: KernelIdentity, directory: Path
    ) -> dict[str, str]:
        """``name -> why`` for the scripts whose cache in ``directory`` cannot be used."""
        stale: dict[str, str] = {}
        for script in scripts:
            state = cache.inspect(directory, script.name, script.module_suffix)
            reason = cache.staleness(state, wanted_record(script, kernel))
            if reason is None and self.settings.require_signed:
                from stapinit.initscript.verify import signature_problem

                reason = signature_problem(script, kernel, directory, self.log.warning)
            if reason is not None:
                stale[script.name] = reason
        return stale

    def _compile(
        self, scripts: Sequence[Script], kernel: KernelIdentity, directory: Path
    ) -> list[CompileResult]:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CommandError(
                f"cannot create cache directory {directory}: {error.strerror}"
            ) from None
        for script in scripts:
            self.log.info(f"Compiling {script.name} for {kernel.release}")
        if self.settings.compile_servers:
            from stapinit.initscript import remote

            results = remote.compile_many(
                self.settings.compile_servers,
                scripts,
                kernel,
                directory,
                self.settings.temp_path,
                self.settings.compile_timeout,
                self.log.warning,
                self.is_interrupted,
            )
        else:
            results = compile_many(
                self.settings.stap,
                scripts,
                kernel,
                directory,
                self.settings.temp_path,
                self.settings.compile_timeout,
                self.is_interrupted,
            )
        self.check_interrupted()
        for result in results:
            if result.argv:
                self.log.exec(result.argv)
            self.log.output(f"stap output for {result.name}", result.output)
            if result.ok:
                self.log.report(f"Compiled {result.name}")
            else:
                self.log.error(f"Failed to compile {result.name}: {result.summary}")
        return results

    def compile(self, request: Request) -> int:
        """Compile the named (or all) scripts for ``-r`` (spec §2.2.5)."""
        kernel = target_kernel(request.release)
        scripts = self.scripts(kernel.release)
        names = self.select(request, scripts)[0] if request.scripts else sorted(scripts)
        chosen = [scripts[name] for name in names]
        directory = cache_dir(self.settings, kernel.release)
        existing = [
            path for script in chosen for path in cache.cached_files(directory, script.name)
        ]
        if existing and not request.assume_yes:
            listing = "\n".join(f"  {path}" for path in existing)
            print(f"These caches exist:\n{listing}", file=self.log.out)
            if not self.confirm("Overwrite existing caches?"):
                raise CommandError("not overwriting existing caches; nothing compiled")
        if not chosen:
            self.log.warning("no scripts to compile")
            return EXIT_OK
        failures = [r.name for r in self._compile(chosen, kernel, directory) if not r.ok]
        return self._verdict("compile", failures)

    def cleanup(self, request: Request) -> int:
        """Remove the named (or all) scripts' caches for ``-r`` (spec §2.2.6)."""
        release = request.release or running_kernel().release
        directory = cache_dir(self.settings, release)
        if request.scripts:
            names = list(request.scripts)
        else:
            names = sorted({p.name.rsplit(".", 1)[0] for p in _listdir(directory)})
        existing = [path for name in names for path in cache.cached_files(directory, name)]
        if not existing:
            print(f"No caches to remove in {directory}", file=self.log.out)
            return EXIT_OK
        if not request.assume_yes:
            listing = "\n".join(f"  {path}" for path in existing)
            print(f"These caches will be removed:\n{listing}", file=self.log.out)
            if not self.confirm("Remove these caches?"):
                raise CommandError("not removing caches; nothing changed")
        for name in names:
            for path in cache.remove(directory, name):
                self.log.report(f"Removed {path}")
        return EXIT_OK

    # -- start ---------------------------------------------------------------

    def _runtime(self, script: Script, record: Instance | None = None) -> Runtime:
        """The runtime a script is started with, or, once started, the one it runs under.

        The status record wins: NAME_OPT may have changed runtime since the
        start, and the running process must still be found and stopped.
        """
        return self.runtimes[record.kind if record else script.runtime]

    def _state(self, script: Script) -> State:
        record = status.read(self.settings.stat_path, script.name)
        return self._runtime(script, record).state(script.name, record)

    def _unrecorded(self, names: Iterable[str], directory: Path) -> dict[str, Instance]:
        """The stapbpf processes that run the module of one of ``names`` (scripts without
        a status record).

        A start killed between spawning stapbpf and recording it leaves one.
        """
        candidates = {name: str(cache.module_path(directory, name, ".bo")) for name in names}
        found: dict[str, Instance] = {}
        for name, running in bpf.find_running(candidates).items() if candidates else ():
            ready = bpf.is_ready(running.pid, os.uname().machine)
            phase: Phase = "ready" if ready else "starting"
            found[name] = Instance(
                name, "bpf", running.pid, running.start_time, candidates[name], phase
            )
        return found

    def _adopt_unrecorded(self, scripts: Iterable[Script], directory: Path) -> None:
        """Record every :meth:`_unrecorded` process: from now on ``status`` and ``stop``
        see it, and ``start`` never runs the script twice."""
        names = [s.name for s in scripts if status.read(self.settings.stat_path, s.name) is None]
        for name, record in self._unrecorded(names, directory).items():
            status.write(self.settings.stat_path, record)
            self.log.warning(f"{name} (pid {record.pid}) ran without a status record; recorded it")

    def start(self, request: Request) -> int:
        """Start the scripts, compiling stale ones first (spec §2.2.1)."""
        kernel = running_kernel()
        scripts = self.scripts(kernel.release)
        if not scripts:
            self.log.warning(f"no scripts in {self.settings.script_path}")
            return EXIT_OK
        order, missing = self.select(request, scripts, self.settings.default_start)
        failed: dict[str, str] = {}
        directory = cache_dir(self.settings, kernel.release)
        self._adopt_unrecorded((scripts[name] for name in order), directory)
        to_start: list[str] = []
        resume: set[str] = set()  # started by a start that was killed before they were ready
        for name in order:
            state = self._state(scripts[name])
            if state in (State.RUNNING, State.FOREIGN):
                self.log.report(f"{name} is already running")
                continue
            if state is State.STARTING:
                resume.add(name)
            to_start.append(name)
        fresh = [scripts[n] for n in to_start if n not in resume]
        stale = self.stale_scripts(fresh, kernel, directory)
        for name, why in stale.items():
            self.log.info(f"The cache of {name} cannot be used: {why}")
        if stale and self.settings.autocompile:
            for result in self._compile([scripts[n] for n in stale], kernel, directory):
                if not result.ok:
                    failed[result.name] = f"compile failed: {result.summary}"
            if self.settings.require_signed:  # what was just compiled must verify too
                compiled = [scripts[n] for n in stale if n not in failed]
                for name, why in self.stale_scripts(compiled, kernel, directory).items():
                    failed[name] = f"refused: {why}"
                    self.log.error(f"{name} {failed[name]}")
        elif stale:
            for name, why in stale.items():
                failed[name] = f"no valid cache for {name}: {why}"
                self.log.error(failed[name])
        requires = requirements_map(scripts)
        levels = deps.levels(to_start, requires)
        for index, level in enumerate(levels):
            self.check_interrupted()
            if self.settings.passall and failed:
                left = [n for later in levels[index:] for n in later if n not in failed]
                if left:
                    self.log.error(
                        f"not started, as PASSALL=yes and a script failed: {' '.join(left)}"
                    )
                break
            startable: list[str] = []
            for name in level:
                if name in failed:
                    continue
                blocker = deps.blocked_by(name, failed, requires)
                if blocker is not None:
                    failed[name] = f"not started: requirement {blocker} failed"
                    self.log.error(f"{name} {failed[name]}")
                else:
                    startable.append(name)
            outcomes = parallel_map(
                _guarded(lambda name: self._start_one(scripts[name], directory, name in resume)),
                startable,
                self.settings.start_jobs,
            )
            # Reported in dependency order, whatever order they became ready in.
            for name, outcome in zip(startable, outcomes, strict=True):
                if isinstance(outcome, StapinitError):
                    failed[name] = str(outcome)
                    self.log.error(f"Failed to start {name}: {outcome}")
                elif outcome.phase == "exited":
                    self.log.report(f"{name} ran and exited (status {outcome.exit_status})")
                else:
                    pid = f" (pid {outcome.pid})" if outcome.pid else ""
                    self.log.report(f"Started {name}{pid}")
        self.check_interrupted()
        # A DEFAULT_START name that is no script fails only itself.
        return self._verdict("start", [*missing, *failed])

    def _start_one(self, script: Script, directory: Path, resume: bool = False) -> Instance:
        """Start one script and wait until it is ready; its record exists throughout.

        ``resume``: a process an earlier, killed start left loading is waited
        for, not started again.
        """
        self.check_interrupted()
        output = self.log.output_fd()
        offset = _offset(output) if output is not None else 0
        earlier = status.read(self.settings.stat_path, script.name) if resume else None
        if earlier is not None:
            runtime = self._runtime(script, earlier)
            self.log.info(f"Waiting for {script.name} (pid {earlier.pid}) to be ready")
            instance = earlier
        else:
            runtime = self._runtime(script)
            module = cache.module_path(directory, script.name, script.module_suffix)
            options = script.start_options()
            self.log.info(f"Starting {script.name}")
            devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC) if output is None else None
            fd = output if output is not None else devnull
            assert fd is not None
            try:
                instance = runtime.launch(script.name, str(module), options, fd)
            finally:
                if devnull is not None:
                    os.close(devnull)
            self._record(runtime, instance)
        try:
            ready = runtime.wait_ready(instance, self.is_interrupted)
        except RuntimeFailure as error:
            # Whatever half-started (a module staprun loaded before it was
            # killed) goes again before the record does.
            try:
                runtime.stop(script.name, instance, self.log)
            except RuntimeFailure as again:
                self.log.error(f"{script.name}: {again}")
            else:
                status.remove(self.settings.stat_path, script.name)
            message = _last_error(output, offset) if output is not None else ""
            raise RuntimeFailure(f"{error}: {message}" if message else str(error)) from None
        self._record(runtime, ready)
        return ready

    def _record(self, runtime: Runtime, instance: Instance) -> None:
        try:
            status.write(self.settings.stat_path, instance)
        except OSError as error:
            # Untracked, it would be invisible to status and loaded again by
            # the next start: stop it and count the start as failed.
            runtime.stop(instance.name, instance, self.log)
            with contextlib.suppress(OSError):
                status.remove(self.settings.stat_path, instance.name)
            raise RuntimeFailure(
                f"cannot write its status file in {self.settings.stat_path}: {error.strerror};"
                " stopped it again"
            ) from None

    # -- stop ----------------------------------------------------------------

    def stop(self, request: Request) -> int:
        """Stop the named (or all running) scripts, dependents first (spec §2.2.2).

        Works from the status records whatever else is broken; scripts of a
        level stop together, levels in reverse start order.
        """
        scripts = self.scripts_for_shutdown(running_kernel().release)
        stat_path = self.settings.stat_path
        directory = cache_dir(self.settings, running_kernel().release)
        self._adopt_unrecorded(scripts.values(), directory)
        requires = requirements_map(scripts)
        if request.scripts:
            for name in request.scripts:
                if name not in scripts:
                    raise CommandError(f"no such script: {name}", EXIT_NOT_INSTALLED)
            chosen = set(request.scripts)
            if request.recursive or self.settings.recursive:
                chosen = deps.with_dependents(chosen, requires)
        else:
            chosen = set(scripts)
        order, problems = deps.lenient_stop_order(chosen, requires)
        for problem in problems:
            self.log.warning(f"{problem}; stopping anyway")
        failures: list[str] = []
        start_levels = deps.levels(list(reversed(order)), _acyclic(requires, order))
        for level in reversed(start_levels):
            self.check_interrupted()
            running: list[tuple[str, Instance | None]] = []
            for name in level:
                record = status.read(stat_path, name)
                state = self._runtime(scripts[name], record).state(name, record)
                if state in (State.RUNNING, State.STARTING, State.FOREIGN):
                    running.append((name, record))
                elif record is not None:
                    status.remove(stat_path, name)
                    done = "ran and exited" if state is State.EXITED else "was dead"
                    self.log.report(f"{name} {done}; removed its status file")
                elif request.scripts:
                    self.log.report(f"{name} is not running")
            outcomes = parallel_map(
                _guarded(lambda item: self._stop_one(scripts[item[0]], item[1])),
                running,
                self.settings.start_jobs,
            )
            for (name, _), outcome in zip(running, outcomes, strict=True):
                if isinstance(outcome, StapinitError):
                    failures.append(name)
                    self.log.error(f"Failed to stop {name}: {outcome}")
                elif outcome is Ending.KILLED:
                    self.log.report(f"Stopped {name} (killed: its end probes did not run)")
                else:
                    self.log.report(f"Stopped {name}")
        return self._verdict("stop", failures)

    def _stop_one(self, script: Script, record: Instance | None) -> Ending:
        self.log.info(f"Stopping {script.name}")
        ending = self._runtime(script, record).stop(script.name, record, self.log)
        status.remove(self.settings.stat_path, script.name)
        return ending

    def restart(self, request: Request, only_if_running: bool = False) -> int:
        """Stop then start; with ``only_if_running`` do nothing when nothing runs."""
        if only_if_running:
            scripts = self.scripts_for_shutdown(running_kernel().release)
            for name in request.scripts:
                if name not in scripts:
                    raise CommandError(f"no such script: {name}", EXIT_NOT_INSTALLED)
            names = request.scripts or tuple(scripts)
            if not any(self._state(scripts[n]) is State.RUNNING for n in names):
                self.log.report("No scripts are running; nothing to restart")
                return EXIT_OK
        code = self.stop(request)
        if code != EXIT_OK:
            return code
        return self.start(request)

    # -- status ------------------------------------------------------------

    def status(self, request: Request) -> int:
        """Report each script's state with LSB wording and exit codes (spec §2.2.4)."""
        kernel = running_kernel()
        scripts = self.scripts_for_shutdown(kernel.release)
        for name in request.scripts:
            if name not in scripts:
                self._print_status(request, [], missing=name)
                return STATUS_UNKNOWN
        if not scripts:
            self._print_status(request, [], none=True)
            return STATUS_NOT_RUNNING
        names = list(request.scripts) or sorted(scripts)
        directory = cache_dir(self.settings, kernel.release)
        # Each record read once: states, the unrecorded processes and the reports use it.
        records = {name: status.read(self.settings.stat_path, name) for name in scripts}
        states = {
            name: self._runtime(script, records[name]).state(name, records[name])
            for name, script in scripts.items()
        }
        unrecorded = self._unrecorded([n for n, r in records.items() if r is None], directory)
        states.update((name, State.RUNNING) for name in unrecorded)
        records.update(unrecorded)
        reports = [
            self._report(scripts[name], records[name], states, directory, kernel) for name in names
        ]
        self._print_status(request, reports)
        found = {report.state for report in reports}
        if found <= {State.RUNNING, State.EXITED}:
            return EXIT_OK
        if found & {State.DEAD, State.FOREIGN}:
            return STATUS_DEAD_WITH_PIDFILE
        return STATUS_NOT_RUNNING

    def _print_status(
        self,
        request: Request,
        reports: Sequence[ScriptStatus],
        missing: str | None = None,
        none: bool = False,
    ) -> None:
        if request.json:
            import json  # only monitoring asks for JSON

            document: dict[str, object] = {"scripts": [r.to_json() for r in reports]}
            if missing is not None:
                document["error"] = f"no such script: {missing}"
            print(json.dumps(document, indent=2), file=self.log.out)
        elif missing is not None:
            print(f"{missing}: no such script", file=self.log.out)
        elif none:
            print("No systemtap scripts are present", file=self.log.out)
        else:
            for report in reports:
                print(report.describe(), file=self.log.out)

    def _report(
        self,
        script: Script,
        record: Instance | None,
        states: dict[str, State],
        directory: Path,
        kernel: KernelIdentity,
    ) -> ScriptStatus:
        state = states[script.name]
        stale = self.stale_scripts([script], kernel, directory).get(script.name)
        live = record is not None and Process(record.pid, record.start_time).alive()
        return ScriptStatus(
            name=script.name,
            state=state,
            pid=record.pid if record and record.pid > 0 and live else None,
            runtime=record.kind if record else script.runtime,
            requires=tuple(script.requires),
            requires_not_running=tuple(
                req
                for req in script.requires
                if req in states and states[req] not in (State.RUNNING, State.EXITED)
            ),
            cache="valid" if stale is None else f"stale: {stale}",
            module=str(cache.module_path(directory, script.name, script.module_suffix)),
            exit_status=record.exit_status if record else None,
        )

    # -- helpers -----------------------------------------------------------

    def _verdict(self, command: str, failures: Sequence[str]) -> int:
        """PASSALL decides whether failures fail the command (spec §4.1.7)."""
        if not failures:
            return EXIT_OK
        listing = " ".join(failures)
        if self.settings.passall:
            self.log.error(f"{command} failed: {listing}")
            return EXIT_FAILED
        self.log.warning(f"{command} failed for some scripts: {listing}")
        return EXIT_OK


T = TypeVar("T")
R = TypeVar("R")


def _guarded(work: Callable[[T], R]) -> Callable[[T], R | StapinitError]:
    """``work`` with a user-facing failure returned instead of raised (for :func:`parallel_map`)."""

    def guarded(item: T) -> R | StapinitError:
        try:
            return work(item)
        except StapinitError as error:
            return error
        except OSError as error:
            where = f"{error.filename}: " if error.filename else ""
            return StapinitError(f"{where}{error.strerror or error}")

    return guarded


def _acyclic(requires: dict[str, Sequence[str]], order: Sequence[str]) -> dict[str, list[str]]:
    """``requires`` cut down to edges that agree with ``order`` (a lenient stop order)."""
    position = {name: index for index, name in enumerate(order)}
    return {
        name: [r for r in reqs if r in position and position[r] > position.get(name, -1)]
        for name, reqs in requires.items()
    }


def _offset(fd: int) -> int:
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        return 0


def _last_error(fd: int, offset: int) -> str:
    """The last message a failed loader wrote to the log after ``offset``, without colours."""
    try:
        text = os.pread(fd, 64 * 1024, offset).decode(errors="replace")
    except OSError:
        return ""
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    # The loader's own lines, not the service's (time-stamped) ones.
    lines = [line for line in lines if line and not _OUR_LINE.match(line)]
    # stapbpf says "ERROR: why", then a summary ("WARNING: Number of errors: 1").
    errors = [line for line in lines if line.startswith("ERROR") or "error" in line.lower()]
    errors = [line for line in errors if "Number of errors" not in line]
    return (errors or lines or [""])[-1]


def _listdir(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.suffix in (".ko", ".bo", ".opts"))
    except (FileNotFoundError, NotADirectoryError):
        return []
