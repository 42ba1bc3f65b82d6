"""Runs the real ``stap -p4`` for one request, in a fresh directory, within limits.

Each compile gets a private directory under the server's temp root holding the
script, the client's tapsets, stap's own ``SYSTEMTAP_DIR`` and ``TMPDIR`` (so no
state leaks between requests), and is removed afterwards; directories left by a
server that died are removed at start-up.  stap runs in its own process group
under ``prlimit`` (address-space limit) and is killed with its whole group when it
exceeds the wall-time limit.  Its output is read as it comes and kept up to
:data:`MAX_OUTPUT` bytes per stream.  When the server runs as root, stap runs as
the service user instead.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from stapinit.core.system import SYSTEM_PATH
from stapinit.protocol import MAX_MODULE_BYTES, CompileRequest, Module
from stapinit.server.policy import (
    EVAL_SCRIPT_FILE,
    ParsedOptions,
    module_file_name,
    stap_command,
)

MASK: Final = "<tmpdir>"
#: Bytes of stdout and of stderr kept from one stap run; the rest is read and dropped.
MAX_OUTPUT: Final = 1024 * 1024
#: Prefix of the per-compile directories under the temp root.
WORKDIR_PREFIX: Final = "stap-"
TRUNCATED: Final = "\n[stap-server: output truncated]\n"
#: After killing a compile, how long to wait for its pipes to close.
_KILL_GRACE: Final = 5.0
_CHUNK: Final = 64 * 1024


class CompilerSetupError(Exception):
    """The compiler cannot work on this host; ``str()`` is one line."""


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
class CompileResult:
    """stap's exit status, its (masked) output, and the module when it made one."""

    status: int
    stdout: str
    stderr: str
    module: Module | None
    timed_out: bool = False


def mask_paths(text: str, workdir: Path) -> str:
    """Replace the compile directory in stap's output with a fixed token."""
    return text.replace(str(workdir), MASK)


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
    """Compiles checked requests with the real stap."""

    def __init__(self, stap: str, tmp_root: Path, limits: Limits, run_as: RunAs | None) -> None:
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
        """stap's version line, ``Systemtap translator/driver (version 4.8/...)``."""
        workdir = self._new_workdir()
        try:
            self._hand_over(workdir)
            drop = self.run_as
            proc = subprocess.run(
                [self.stap, "-V"],
                capture_output=True,
                timeout=60,
                check=False,
                env=self._env(workdir),
                user=None if drop is None else drop.uid,
                group=None if drop is None else drop.gid,
                extra_groups=None if drop is None else [],
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CompilerSetupError(f"cannot run {self.stap} -V: {exc}") from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        text = (proc.stderr + proc.stdout).decode("utf-8", "replace")
        for line in text.splitlines():
            if "version" in line and "Systemtap" in line:
                return line.strip()
        raise CompilerSetupError(f"{self.stap} -V did not print a version")

    @staticmethod
    def _env(workdir: Path) -> dict[str, str]:
        # stap's own cache and rc file live in SYSTEMTAP_DIR: a fresh one per run.
        return {
            "PATH": SYSTEM_PATH,
            "LC_ALL": "C",
            "HOME": str(workdir / "home"),
            "SYSTEMTAP_DIR": str(workdir / "home" / ".systemtap"),
            "TMPDIR": str(workdir / "tmp"),
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
        return workdir, None if tapset_dir is None else str(tapset_dir)

    def compile(self, req: CompileRequest, parsed: ParsedOptions) -> CompileResult:
        """Run ``stap -p4`` for a checked request and collect what it produced."""
        try:
            workdir, tapset_dir = self._prepare(req)
        except OSError as exc:  # a full disk, say
            reason = exc.strerror or str(exc)
            return CompileResult(
                1, "", f"stap-server: cannot prepare the compile: {reason}\n", None
            )
        try:
            return self._run(req, parsed, workdir, tapset_dir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _run(
        self, req: CompileRequest, parsed: ParsedOptions, workdir: Path, tapset_dir: str | None
    ) -> CompileResult:
        argv = [
            self.prlimit,
            f"--as={self.limits.memory_bytes}",
            "--",
            *stap_command(self.stap, req, parsed, tapset_dir),
        ]
        drop = self.run_as
        with contextlib.ExitStack() as stack:
            # An -e script reaches stap on standard input (see stap_command).
            stdin: int | IO[bytes] = subprocess.DEVNULL
            if req.eval:
                stdin = stack.enter_context((workdir / "build" / EVAL_SCRIPT_FILE).open("rb"))
            try:
                proc = subprocess.Popen(
                    argv,
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
            except OSError as exc:
                # E2BIG (options too long for one command line), EAGAIN, ENOMEM...
                reason = exc.strerror or str(exc)
                return CompileResult(1, "", f"stap-server: cannot run stap: {reason}\n", None)
        return self._collect(proc, req, parsed, workdir)

    def _collect(
        self,
        proc: subprocess.Popen[bytes],
        req: CompileRequest,
        parsed: ParsedOptions,
        workdir: Path,
    ) -> CompileResult:
        """Read stap's output within the wall-time limit, wait for it, take its module."""
        assert proc.stdout is not None and proc.stderr is not None
        with self._lock:
            self._live.add(proc)
        deadline = time.monotonic() + self.limits.wall_seconds
        try:
            with proc.stdout, proc.stderr:
                # The whole group: make and gcc must not outlive the request.  stap is
                # not reaped yet, so its pid still names this group.
                (out, err), timed_out = read_capped(
                    [proc.stdout, proc.stderr], deadline, lambda: self._kill_group(proc)
                )
            if not timed_out:
                try:
                    proc.wait(max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:  # it closed its output but went on
                    timed_out = True
                    self._kill_group(proc)
            proc.wait()
        finally:
            with self._lock:
                self._live.discard(proc)
        status = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        stdout = mask_paths(out.text(), workdir)
        stderr = mask_paths(err.text(), workdir)
        if timed_out:
            stderr += (
                f"stap-server: compilation exceeded the time limit of "
                f"{self.limits.wall_seconds:g} s and was stopped\n"
            )
        module = None
        if status == 0 and not timed_out:
            name = module_file_name(stdout, req.module_name, parsed.runtime)
            data = None if name is None else _read_module(workdir / "build" / name)
            if name is None or data is None:
                status = 1
                stderr += "stap-server: stap reported success but left no module\n"
            else:
                module = Module(name, data)
        return CompileResult(status, stdout, stderr, module, timed_out)

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        """Stop every compile in progress (at shutdown)."""
        with self._lock:
            live = list(self._live)
        for proc in live:
            if proc.returncode is None:  # not reaped, so the group id is still ours
                self._kill_group(proc)
