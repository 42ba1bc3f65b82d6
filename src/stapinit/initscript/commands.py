"""The service commands: compile, cleanup, start, stop, restart, status (spec §2.2)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import NamedTuple, TextIO

from stapinit.core import process as processes
from stapinit.core.lsb import (
    EXIT_FAILED,
    EXIT_NOT_CONFIGURED,
    EXIT_NOT_INSTALLED,
    EXIT_OK,
    EXIT_PRIVILEGE,
    STATUS_DEAD_WITH_PIDFILE,
    STATUS_NOT_RUNNING,
    STATUS_UNKNOWN,
)
from stapinit.initscript import cache, deps, status
from stapinit.initscript.cache import KernelIdentity, running_kernel, target_kernel
from stapinit.initscript.compiler import CompileResult, compile_many, wanted_record
from stapinit.initscript.lock import ServiceLock
from stapinit.initscript.log import Log
from stapinit.initscript.runtimes import Runtime, RuntimeFailure, Tools, runtime_for
from stapinit.initscript.scripts import (
    Script,
    ScriptError,
    cache_dir,
    find_scripts,
    requirements_map,
)
from stapinit.initscript.settings import Settings
from stapinit.initscript.status import StatusRecord


class CommandError(Exception):
    """A command cannot go on; carries the exit code and a one-line message."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class Request(NamedTuple):
    """What the command line asked for, beyond the command itself."""

    scripts: tuple[str, ...] = ()
    release: str | None = None
    recursive: bool = False
    assume_yes: bool = False
    json: bool = False
    archive: Path | None = None  # pack: the file to write (-o); unpack: the file to read
    all_kernels: bool = False  # compile: every release with a build tree (--all-kernels)


Confirm = Callable[[str], bool]


class Service:
    """The scripts of one configuration and the commands that act on them."""

    def __init__(
        self,
        settings: Settings,
        log: Log,
        confirm: Confirm,
        out: TextIO | None = None,
    ) -> None:
        self.settings = settings
        self.log = log
        self.confirm = confirm
        self.out = out or sys.stdout
        # Set by the CLI's SIGTERM/SIGINT handler; checked between scripts so that
        # a signal never leaves a started loader without its status file.
        self.interrupted = False
        self.tools = Tools(
            staprun=settings.staprun,
            stapbpf=settings.stapbpf,
            modules_list=settings.modules_list,
            log_file=settings.log_file,
            stop_timeout=settings.stop_timeout,
        )

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

    def select(
        self, request: Request, scripts: dict[str, Script], default: Sequence[str] = ()
    ) -> list[str]:
        """The scripts a command acts on, in start order (spec §2.3.2-2.3.3)."""
        named = list(request.scripts)
        for name in named:
            if name not in scripts:
                raise CommandError(f"no such script: {name}", EXIT_NOT_INSTALLED)
        requires = requirements_map(scripts)
        if named:
            chosen = set(named)
            follow = request.recursive or self.settings.recursive
        else:
            chosen = set(default) if default else set(scripts)
            unknown = sorted(chosen - set(scripts))
            if unknown:
                raise CommandError(
                    f"DEFAULT_START names {unknown[0]}, which is not a script", EXIT_NOT_CONFIGURED
                )
            follow = True
        if follow:
            chosen = deps.with_requirements(chosen, requires)
        try:
            return deps.start_order(chosen, requires)
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
            source_mtime = _mtime(script.source) if script.source else None
            reason = cache.staleness(state, wanted_record(script, kernel), source_mtime)
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
        results = compile_many(
            self.settings.stap, scripts, kernel, directory, self.settings.temp_path
        )
        self.check_interrupted()
        for result in results:
            if result.argv:
                self.log.exec(result.argv)
            self.log.output(f"stap output for {result.name}", result.output)
            if result.ok:
                self.log.info(f"Compiled {result.name}")
                print(f"Compiled {result.name}", file=self.out)
            else:
                self.log.error(f"Failed to compile {result.name}: {result.summary}")
        return results

    def compile(self, request: Request) -> int:
        """Compile the named (or all) scripts for ``-r`` (spec §2.2.5)."""
        with self._lock_if_possible("compile"):
            return self._compile_request(request)

    def _compile_request(self, request: Request) -> int:
        kernel = target_kernel(request.release)
        scripts = self.scripts(kernel.release)
        names = self.select(request, scripts) if request.scripts else sorted(scripts)
        chosen = [scripts[name] for name in names]
        directory = cache_dir(self.settings, kernel.release)
        existing = [
            path for script in chosen for path in cache.cached_files(directory, script.name)
        ]
        if existing and not request.assume_yes:
            listing = "\n".join(f"  {path}" for path in existing)
            print(f"These caches exist:\n{listing}", file=self.out)
            if not self.confirm("Overwrite existing caches?"):
                raise CommandError("not overwriting existing caches; nothing compiled")
        if not chosen:
            self.log.warning("no scripts to compile")
            return EXIT_OK
        failures = [r.name for r in self._compile(chosen, kernel, directory) if not r.ok]
        return self._verdict("compile", failures)

    def cleanup(self, request: Request) -> int:
        """Remove the named (or all) scripts' caches for ``-r`` (spec §2.2.6)."""
        with self._lock_if_possible("cleanup"):
            return self._cleanup_request(request)

    def _cleanup_request(self, request: Request) -> int:
        release = request.release or running_kernel().release
        directory = cache_dir(self.settings, release)
        if request.scripts:
            names = list(request.scripts)
        else:
            names = sorted({p.name.rsplit(".", 1)[0] for p in _listdir(directory)})
        existing = [path for name in names for path in cache.cached_files(directory, name)]
        if not existing:
            print(f"No caches to remove in {directory}", file=self.out)
            return EXIT_OK
        if not request.assume_yes:
            listing = "\n".join(f"  {path}" for path in existing)
            print(f"These caches will be removed:\n{listing}", file=self.out)
            if not self.confirm("Remove these caches?"):
                raise CommandError("not removing caches; nothing changed")
        for name in names:
            for path in cache.remove(directory, name):
                self.log.info(f"Removed {path}")
                print(f"Removed {path}", file=self.out)
        return EXIT_OK

    # -- start and stop ----------------------------------------------------

    def _runtime(self, script: Script, record: StatusRecord | None = None) -> Runtime:
        """The runtime a script is started with, or, once started, the one it runs under.

        The status file wins: NAME_OPT may have changed runtime since the start,
        and the running process must still be found and stopped.
        """
        return runtime_for(record.runtime if record else script.runtime, self.tools)

    def _is_running(self, script: Script) -> bool:
        record = status.read(self.settings.stat_path, script.name)
        return self._runtime(script, record).is_running(script.name, record)

    def _lock_if_possible(self, command: str) -> AbstractContextManager[object]:
        """The lock, when this user may take it.

        compile and cleanup change the cache a start reads, so they hold the
        lock too; but a build host's user without access to STAT_PATH may still
        compile into a cache of their own.
        """
        stat_path = self.settings.stat_path
        target = stat_path if stat_path.exists() else stat_path.parent
        return self._lock(command) if os.access(target, os.W_OK) else nullcontext()

    def _lock(self, command: str) -> ServiceLock:
        stat_path = self.settings.stat_path
        try:
            stat_path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CommandError(f"cannot create STAT_PATH {stat_path}: {error.strerror}") from None
        if not os.access(stat_path, os.W_OK):
            raise CommandError(f"STAT_PATH {stat_path} is not writable", EXIT_PRIVILEGE)
        return ServiceLock(stat_path, self.settings.lock_timeout, command)

    def start(self, request: Request) -> int:
        """Start the scripts, compiling stale ones first (spec §2.2.1)."""
        with self._lock("start"):
            return self._start(request)

    def _start(self, request: Request) -> int:
        kernel = running_kernel()
        scripts = self.scripts(kernel.release)
        if not scripts:
            self.log.warning(f"no scripts in {self.settings.script_path}")
            return EXIT_OK
        order = self.select(request, scripts, self.settings.default_start)
        directory = cache_dir(self.settings, kernel.release)
        to_start = [scripts[n] for n in order if not self._is_running(scripts[n])]
        for name in order:
            if scripts[name] not in to_start:
                print(f"{name} is already running", file=self.out)
        failed: dict[str, str] = {}
        stale = self.stale_scripts(to_start, kernel, directory)
        if stale and self.settings.autocompile:
            for result in self._compile([scripts[n] for n in stale], kernel, directory):
                if not result.ok:
                    failed[result.name] = f"compile failed: {result.summary}"
        elif stale:
            for name in stale:
                failed[name] = f"no valid cache for {name}"
                self.log.error(failed[name])
        requires = requirements_map(scripts)
        for script in to_start:
            self.check_interrupted()
            if script.name in failed:
                continue
            blocker = deps.blocked_by(script.name, failed, requires)
            if blocker is not None:
                failed[script.name] = f"not started: requirement {blocker} failed"
                self.log.error(f"{script.name} {failed[script.name]}")
                continue
            if self.settings.passall and failed:
                index = to_start.index(script)
                left = " ".join(s.name for s in to_start[index:] if s.name not in failed)
                self.log.error(f"not started, as PASSALL=yes and a script failed: {left}")
                break
            try:
                self._start_one(script, directory)
            except (RuntimeFailure, ScriptError) as error:
                failed[script.name] = str(error)
                self.log.error(f"Failed to start {script.name}: {error}")
        return self._verdict("start", list(failed))

    def _start_one(self, script: Script, directory: Path) -> None:
        module = cache.module_path(directory, script.name, script.module_suffix)
        options = script.start_options()
        self.log.info(f"Starting {script.name}")
        runtime = self._runtime(script)
        record = runtime.start(script.name, module, options, self.log)
        try:
            status.write(self.settings.stat_path, record)
        except OSError as error:
            # Untracked, it would be invisible to status and loaded again by
            # the next start: stop it and count the start as failed.
            runtime.stop(script.name, record, self.log)
            raise RuntimeFailure(
                f"cannot write its status file in {self.settings.stat_path}: {error.strerror};"
                " stopped it again"
            ) from None
        pid = f" (pid {record.pid})" if record.pid else ""
        self.log.info(f"Started {script.name}{pid}")
        print(f"Started {script.name}{pid}", file=self.out)

    def stop(self, request: Request) -> int:
        """Stop the named (or all running) scripts, dependents first (spec §2.2.2)."""
        with self._lock("stop"):
            return self._stop(request)

    def _stop(self, request: Request) -> int:
        scripts = self._with_orphans(self.scripts(running_kernel().release))
        stat_path = self.settings.stat_path
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
        for name in order:
            self.check_interrupted()
            script = scripts[name]
            record = status.read(stat_path, name)
            runtime = self._runtime(script, record)
            if not runtime.is_running(name, record):
                if record is not None:
                    status.remove(stat_path, name)
                    self.log.info(f"Removed stale status file of {name}")
                    print(f"{name} was dead; removed its status file", file=self.out)
                elif request.scripts:
                    print(f"{name} is not running", file=self.out)
                continue
            self.log.info(f"Stopping {name}")
            try:
                runtime.stop(name, record, self.log)
            except RuntimeFailure as error:
                failures.append(name)
                self.log.error(f"Failed to stop {name}: {error}")
                continue
            status.remove(stat_path, name)
            self.log.info(f"Stopped {name}")
            print(f"Stopped {name}", file=self.out)
        return self._verdict("stop", failures)

    def _with_orphans(self, scripts: dict[str, Script]) -> dict[str, Script]:
        """``scripts`` plus those whose status file outlived their ``.stp`` file.

        Such a status file still names something that may run: status reports
        it and stop stops it.
        """
        stat_path = self.settings.stat_path
        for name in status.recorded_names(stat_path):
            if name not in scripts:
                orphan = status.read(stat_path, name)
                kind = orphan.runtime if orphan else "kmod"
                scripts[name] = Script(name, None, (), (), kind)
        return scripts

    def restart(self, request: Request, only_if_running: bool = False) -> int:
        """Stop then start; with ``only_if_running`` do nothing when nothing runs."""
        with self._lock("restart"):
            if only_if_running and not self._running_names(request):
                print("No scripts are running; nothing to restart", file=self.out)
                return EXIT_OK
            code = self._stop(request)
            if code != EXIT_OK:
                return code
            return self._start(request)

    def _running_names(self, request: Request) -> list[str]:
        scripts = self.scripts(running_kernel().release)
        names = request.scripts or tuple(scripts)
        return [n for n in names if n in scripts and self._is_running(scripts[n])]

    # -- status ------------------------------------------------------------

    def status(self, request: Request) -> int:
        """Report each script's state with LSB wording and exit codes (spec §2.2.4)."""
        kernel = running_kernel()
        scripts = self._with_orphans(self.scripts(kernel.release))
        if not scripts:
            print("No systemtap scripts are present", file=self.out)
            return STATUS_NOT_RUNNING
        for name in request.scripts:
            if name not in scripts:
                print(f"{name}: no such script", file=self.out)
                return STATUS_UNKNOWN
        names = list(request.scripts) or sorted(scripts)
        directory = cache_dir(self.settings, kernel.release)
        running: dict[str, bool] = {}  # each script's state is looked up once
        reports = [
            self._report(scripts[name], scripts, directory, kernel, running) for name in names
        ]
        if request.json:
            import json  # only monitoring asks for JSON

            print(json.dumps({"scripts": reports}, indent=2), file=self.out)
        else:
            for report in reports:
                print(_describe(report), file=self.out)
        states = {report["state"] for report in reports}
        if states == {"running"}:
            return EXIT_OK
        if "dead" in states or "foreign" in states:
            return STATUS_DEAD_WITH_PIDFILE
        return STATUS_NOT_RUNNING

    def _report(
        self,
        script: Script,
        scripts: dict[str, Script],
        directory: Path,
        kernel: KernelIdentity,
        known: dict[str, bool],
    ) -> dict[str, object]:
        record = status.read(self.settings.stat_path, script.name)
        running = self._runtime(script, record).is_running(script.name, record)
        known[script.name] = running
        if running and record is not None:
            state = "running"
        elif running:
            state = "foreign"  # loaded, but not by us: no status file
        elif record is not None:
            state = "dead"
        else:
            state = "stopped"
        stale = self.stale_scripts([script], kernel, directory).get(script.name)
        for req in script.requires:
            if req in scripts and req not in known:
                known[req] = self._is_running(scripts[req])
        not_running = [req for req in script.requires if req in scripts and not known[req]]
        return {
            "name": script.name,
            "state": state,
            "pid": record.pid if record and running and self._pid_alive(record) else None,
            "runtime": script.runtime,
            "requires": list(script.requires),
            "requires_not_running": not_running,
            "cache": "valid" if stale is None else f"stale: {stale}",
            "module": str(cache.module_path(directory, script.name, script.module_suffix)),
        }

    # -- helpers -----------------------------------------------------------

    @staticmethod
    def _pid_alive(record: StatusRecord) -> bool:
        """A recorded pid is shown only while that very process lives."""
        return record.pid > 0 and processes.Process(record.pid, record.start_time).alive()

    def _verdict(self, command: str, failures: Sequence[str]) -> int:
        """PASSALL decides whether failures fail the command (spec §4.1.7)."""
        if not failures:
            return EXIT_OK
        listing = " ".join(failures)
        if self.settings.passall:
            print(f"systemtap-service {command} failed: {listing}", file=sys.stderr)
            return EXIT_FAILED
        self.log.warning(f"{command} failed for some scripts: {listing}")
        return EXIT_OK


def _describe(report: dict[str, object]) -> str:
    name, state = report["name"], report["state"]
    if state == "running":
        pid = report["pid"]
        line = f"{name}({pid}) is running..." if pid else f"{name} is running..."
    elif state == "dead":
        line = f"{name} is dead, but pidfile exists"
    elif state == "foreign":
        line = f"{name} is dead, but another script is running."
    else:
        line = f"{name} is stopped"
    requires = report["requires"]
    if isinstance(requires, list) and requires:
        line += f"\n  requires: {' '.join(requires)}"
        missing = report["requires_not_running"]
        if isinstance(missing, list) and missing:
            line += f" ({' '.join(missing)} not running)"
    return line


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _listdir(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.suffix in (".ko", ".bo", ".opts"))
    except (FileNotFoundError, NotADirectoryError):
        return []
