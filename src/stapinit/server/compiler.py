"""Runs the real ``stap -p4`` for one request, in a fresh directory, within limits.

Each compile gets a private directory under the server's temp root holding the
script, the client's tapsets, stap's own ``SYSTEMTAP_DIR`` and ``TMPDIR`` (so no
state leaks between requests), and is removed afterwards; directories left by a
server that died are removed at start-up.  stap runs in the compile sandbox
(:mod:`stapinit.server.sandbox`), which shows it that directory and nothing of
the server's state, in its own process group under ``prlimit`` (address-space
limit); at the wall-time limit its group gets SIGTERM, then SIGKILL
(:func:`stapinit.core.process.stop_child`), and the sandbox takes everything
left in it along.  Its output is read as it comes and kept up to
:data:`MAX_OUTPUT` bytes per stream.  When the server runs as root, stap runs
as the service user instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import selectors
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from stapinit.core.errors import StapinitError
from stapinit.core.lsb import EXIT_NOT_INSTALLED
from stapinit.core.process import stop_child
from stapinit.core.system import SYSTEM_PATH
from stapinit.protocol import MAX_MODULE_BYTES, CompileRequest, Module
from stapinit.server.policy import (
    EVAL_SCRIPT_FILE,
    ParsedOptions,
    module_file_name,
    stap_command,
)
from stapinit.server.sandbox import INSIDE_WORKDIR, Sandbox

MASK: Final = "<tmpdir>"
#: Bytes of stdout and of stderr kept from one stap run; the rest is read and dropped.
MAX_OUTPUT: Final = 1024 * 1024
#: Prefix of the per-compile directories under the temp root.
WORKDIR_PREFIX: Final = "stap-"
TRUNCATED: Final = "\n[stap-server: output truncated]\n"
#: After stopping a compile, how long to wait for its pipes to close.
_KILL_GRACE: Final = 5.0
#: Between SIGTERM and SIGKILL when a compile is stopped.
_TERM_GRACE: Final = 1.0
_CHUNK: Final = 64 * 1024


class CompilerSetupError(StapinitError):
    """The compiler cannot work on this host; ``str()`` is one line (exit 5)."""

    exit_code = EXIT_NOT_INSTALLED


@dataclass(frozen=True)
class RunAs:
    """The unprivileged identity stap runs under when the server is root."""

    uid: int
    gid: int


@dataclass(frozen=True)
class Limits:
    """Per-compile limits."""

    wall_seconds: float
    memory_bytes: int


@dataclass(frozen=True)
class CompileOutcome:
    """stap's exit status, its (masked) output, and the module when it made one."""

    status: int
    stdout: str
    stderr: str
    module: Module | None
    timed_out: bool = False


def mask_paths(text: str, workdir: Path) -> str:
    """Replace the compile directory (as seen outside and inside the sandbox) with a token."""
    return text.replace(str(workdir), MASK).replace(INSIDE_WORKDIR, MASK)


@dataclass
class _Output:
    """What has been read from one of stap's pipes, up to :data:`MAX_OUTPUT` bytes."""

    data: bytearray
    truncated: bool = False

    def add(self, chunk: bytes) -> None:
        room = MAX_OUTPUT - len(self.data)
        if len(chunk) > room:
            self.truncated = True
        if room > 0:
            self.data += chunk[:room]

    def text(self) -> str:
        text = self.data.decode("utf-8", "replace")
        return text + TRUNCATED if self.truncated else text


def read_capped(
    pipes: list[IO[bytes]], deadline: float, on_deadline: Callable[[], None]
) -> tuple[list[_Output], bool]:
    """Read ``pipes`` to their end, keeping :data:`MAX_OUTPUT` bytes of each.

    When ``deadline`` (a ``time.monotonic()`` value) passes first, ``on_deadline``
    is called (it kills the writers) and the pipes get :data:`_KILL_GRACE` more
    seconds to close.  Returns the outputs, in the order of ``pipes``, and whether
    the deadline passed.
    """
    outputs = [_Output(bytearray()) for _ in pipes]
    selector = selectors.DefaultSelector()
    for pipe, output in zip(pipes, outputs, strict=True):
        selector.register(pipe, selectors.EVENT_READ, output)
    timed_out = False
    try:
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if timed_out:
                    break  # killed, yet something still holds a pipe open: give up on it
                timed_out = True
                on_deadline()
                deadline = time.monotonic() + _KILL_GRACE
                continue
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, _CHUNK)
                if chunk:
                    key.data.add(chunk)
                else:
                    selector.unregister(key.fileobj)
    finally:
        selector.close()
    return outputs, timed_out


def _read_module(path: Path) -> bytes | None:
    """Read the module stap wrote, refusing anything but a plain file of sane size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MODULE_BYTES:
            return None
        data = f.read(MAX_MODULE_BYTES + 1)
        return None if len(data) > MAX_MODULE_BYTES else data


class Compiler:
    """Compiles checked requests with the real stap, each in the sandbox (unless None)."""

    def __init__(
        self,
        stap: str,
        tmp_root: Path,
        limits: Limits,
        run_as: RunAs | None,
        sandbox: Sandbox | None,
    ) -> None:
        found = shutil.which(stap)
        if found is None:
            raise CompilerSetupError(f"cannot find stap ({stap!r}); is systemtap installed?")
        prlimit = shutil.which("prlimit")
        if prlimit is None:
            raise CompilerSetupError("cannot find prlimit (util-linux), needed for memory limits")
        self.stap = found
        self.prlimit = prlimit
        self.tmp_root = tmp_root
        self.limits = limits
        self.run_as = run_as
        self.sandbox = sandbox
        self._live: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        # Traversable but not listable: stap may run as another user than the server.
        tmp_root.mkdir(mode=0o711, parents=True, exist_ok=True)
        tmp_root.chmod(0o711)
        #: Compile directories of an earlier run (one that was killed) removed now.
        self.stale_removed = self._remove_stale()

    def _remove_stale(self) -> int:
        """Remove compile directories left behind; only this server uses the temp root."""
        stale = [e for e in self.tmp_root.iterdir() if e.name.startswith(WORKDIR_PREFIX)]
        for entry in stale:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return len(stale)

    def version(self) -> str:
        """stap's version line, ``Systemtap translator/driver (version 4.8/...)``.

        It runs like a compile (as the compile user, in the sandbox), so that a
        sandbox that cannot work here is found at start-up; raises
        :class:`CompilerSetupError` naming what failed.
        """
        try:
            workdir = self._new_workdir()
            self._hand_over(workdir)
        except OSError as exc:
            raise CompilerSetupError(f"cannot prepare {self.tmp_root}: {exc.strerror}") from None
        try:
            proc = self._start([self.stap, "-V"], workdir, subprocess.DEVNULL)
            outcome = self._collect(proc, workdir, min(self.limits.wall_seconds, 60.0))
        except OSError as exc:
            raise CompilerSetupError(f"cannot run {self.stap} -V: {exc.strerror}") from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        text = outcome.stderr + outcome.stdout
        for line in text.splitlines():
            if "version" in line and "Systemtap" in line:
                return line.strip()
        said = " ".join(text.split())[:300] or f"exit status {outcome.status}"
        if self.sandbox is not None and "bwrap" in text:
            raise CompilerSetupError(
                f"the compile sandbox does not work here ({said}); bubblewrap needs "
                "unprivileged user namespaces for USER (sysctl user.max_user_namespaces, "
                "kernel.unprivileged_userns_clone, or the service manager's "
                "RestrictNamespaces=); or set SANDBOX=no to compile without it"
            )
        raise CompilerSetupError(f"{self.stap} -V did not print a version: {said}")

    def _env(self, workdir: Path) -> dict[str, str]:
        # stap's own cache and rc file live in SYSTEMTAP_DIR: a fresh one per run.
        inside = INSIDE_WORKDIR if self.sandbox is not None else str(workdir)
        return {
            "PATH": SYSTEM_PATH,
            "LC_ALL": "C",
            "HOME": f"{inside}/home",
            "SYSTEMTAP_DIR": f"{inside}/home/.systemtap",
            "TMPDIR": f"{inside}/tmp",
        }

    def _new_workdir(self) -> Path:
        workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=self.tmp_root)).resolve()
        for sub in ("build", "home", "tmp"):
            (workdir / sub).mkdir()
        return workdir

    def _hand_over(self, workdir: Path) -> None:
        """Give the directory to the user stap runs as, when that is not us."""
        if self.run_as is not None:
            for path in [workdir, *workdir.rglob("*")]:
                os.chown(path, self.run_as.uid, self.run_as.gid, follow_symlinks=False)

    def _prepare(self, req: CompileRequest) -> tuple[Path, str | None]:
        """The compile directory with script and tapsets; the tapset directory as stap sees it."""
        workdir = self._new_workdir()
        try:
            script_name = EVAL_SCRIPT_FILE if req.eval else req.script_name
            assert script_name is not None  # the protocol guarantees it
            (workdir / "build" / script_name).write_text(req.script_text, encoding="utf-8")
            tapset_dir = None
            if req.tapsets:
                tapset_dir = workdir / "tapsets"
                for tapset in req.tapsets:
                    # Paths were checked by the protocol: relative, no '..', no leading '.'.
                    target = tapset_dir / tapset.path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(tapset.text, encoding="utf-8")
            self._hand_over(workdir)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        if tapset_dir is None:
            return workdir, None
        inside = INSIDE_WORKDIR if self.sandbox is not None else str(workdir)
        return workdir, f"{inside}/tapsets"

    def compile(self, req: CompileRequest, parsed: ParsedOptions) -> CompileOutcome:
        """Run ``stap -p4`` for a checked request and collect what it produced."""
        try:
            workdir, tapset_dir = self._prepare(req)
        except OSError as exc:  # a full disk, say
            reason = exc.strerror or str(exc)
            return CompileOutcome(
                1, "", f"stap-server: cannot prepare the compile: {reason}\n", None
            )
        try:
            return self._run(req, parsed, workdir, tapset_dir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _run(
        self, req: CompileRequest, parsed: ParsedOptions, workdir: Path, tapset_dir: str | None
    ) -> CompileOutcome:
        argv = stap_command(self.stap, req, parsed, tapset_dir)
        with contextlib.ExitStack() as stack:
            # An -e script reaches stap on standard input (see stap_command).
            stdin: int | IO[bytes] = subprocess.DEVNULL
            if req.eval:
                stdin = stack.enter_context((workdir / "build" / EVAL_SCRIPT_FILE).open("rb"))
            try:
                proc = self._start(argv, workdir, stdin)
            except OSError as exc:
                # E2BIG (options too long for one command line), EAGAIN, ENOMEM...
                reason = exc.strerror or str(exc)
                return CompileOutcome(1, "", f"stap-server: cannot run stap: {reason}\n", None)
        outcome = self._collect(proc, workdir, self.limits.wall_seconds)
        if outcome.status != 0 or outcome.timed_out:
            return outcome
        name = module_file_name(outcome.stdout, req.module_name, parsed.runtime)
        data = None if name is None else _read_module(workdir / "build" / name)
        if name is None or data is None:
            stderr = outcome.stderr + "stap-server: stap reported success but left no module\n"
            return dataclasses.replace(outcome, status=1, stderr=stderr)
        return dataclasses.replace(outcome, module=Module(name, data))

    def _start(
        self, argv: list[str], workdir: Path, stdin: int | IO[bytes]
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own process group, limited, sandboxed, as the compile user."""
        if self.sandbox is not None:
            argv = self.sandbox.command(str(workdir), argv)
        drop = self.run_as
        return subprocess.Popen(
            [self.prlimit, f"--as={self.limits.memory_bytes}", "--", *argv],
            cwd=workdir / "build",
            env=self._env(workdir),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,
            user=None if drop is None else drop.uid,
            group=None if drop is None else drop.gid,
            extra_groups=None if drop is None else [],
        )

    def _collect(
        self, proc: subprocess.Popen[bytes], workdir: Path, wall_seconds: float
    ) -> CompileOutcome:
        """Read stap's output within ``wall_seconds``, wait for it; its status and output."""
        assert proc.stdout is not None and proc.stderr is not None
        with self._lock:
            self._live.add(proc)
        deadline = time.monotonic() + wall_seconds
        try:
            with proc.stdout, proc.stderr:
                # The whole group: make and gcc must not outlive the request.
                (out, err), timed_out = read_capped(
                    [proc.stdout, proc.stderr], deadline, lambda: self._stop(proc)
                )
            if not timed_out:
                try:
                    proc.wait(max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:  # it closed its output but went on
                    timed_out = True
                    self._stop(proc)
            proc.wait()
        finally:
            with self._lock:
                self._live.discard(proc)
        status = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        stdout = mask_paths(out.text(), workdir)
        stderr = mask_paths(err.text(), workdir)
        if timed_out:
            status = status or 1
            stderr += (
                f"stap-server: compilation exceeded the time limit of "
                f"{wall_seconds:g} s and was stopped\n"
            )
        return CompileOutcome(status, stdout, stderr, None, timed_out)

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        stop_child(proc, _TERM_GRACE)

    def kill_all(self) -> None:
        """Stop every compile in progress (at shutdown)."""
        with self._lock:
            live = list(self._live)
        for proc in live:
            self._stop(proc)
