"""Compiling scripts into the cache with the real ``stap -p4`` (spec §2.2.5).

What is compiled is what was checked: each compile gets a fresh private
directory under ``TEMP_PATH`` (``mkdtemp``, mode 0700), the script is read
once from its checked file (not following a symbolic link, not blocking on
a FIFO, a regular file of bounded size and, as root, root's and writable by
no one else) and ``stap`` compiles that private copy. The cache record holds
the copy's SHA-256, so a script that changes (or that someone swapped in
between) never passes for the one cached. The result is moved into the cache
only when complete. Independent compiles run in parallel: after a kernel
update every script needs one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from stapinit.core import process
from stapinit.core.names import is_valid_name
from stapinit.core.parallel import parallel_map
from stapinit.core.system import tool_environment
from stapinit.initscript import cache
from stapinit.initscript.cache import CacheRecord, KernelIdentity
from stapinit.initscript.ownership import open_regular, writable_by
from stapinit.initscript.scripts import Script
from stapinit.initscript.settings import DEFAULTS

#: Largest script compiled: real ones are a few kilobytes.
MAX_SCRIPT_BYTES = 4 * 1024 * 1024
#: ``COMPILE_TIMEOUT``'s default, for callers that do not pass the setting.
DEFAULT_TIMEOUT = float(DEFAULTS["COMPILE_TIMEOUT"])

# stap's message when the kernel has no build tree (session.cxx, "Checking ...").
_NO_BUILD_TREE = re.compile(r'Checking "/lib/modules/([^/"]+)/build/\.config" failed')


class CompileResult(NamedTuple):
    """The outcome of one compile; the caller logs it."""

    name: str
    ok: bool
    summary: str  # one line for the console
    # The command as run, naming the script's own file where stap read a
    # private copy of it (the copy is gone; the file is what one reruns).
    argv: tuple[str, ...] = ()
    output: str = ""  # stap's stdout and stderr, for the log


class ScriptText(NamedTuple):
    """A script as read once from its file: the bytes compiled and their SHA-256."""

    data: bytes
    digest: str


def read_script(path: Path) -> ScriptText:
    """Read a script file the way a compile uses it.

    A script may be a symbolic link (``script.d/x.stp -> /usr/share/...``):
    it is resolved first, and as root every step of it has been judged by
    :mod:`~stapinit.initscript.ownership`, so nobody else can change where it
    leads; the file at its end is opened without following a link or
    blocking. Raises :class:`OSError` (``strerror`` says why) for anything
    but a regular file, more than :data:`MAX_SCRIPT_BYTES`, and, as root, a
    file another user can change.
    """
    with os.fdopen(open_regular(os.path.realpath(path)), "rb") as handle:
        facts = os.fstat(handle.fileno())
        # Judged on the file opened, not on its name: the name was checked
        # before, with every directory above it; this is what is read.
        who = writable_by(facts.st_uid, facts.st_mode) if os.geteuid() == 0 else None
        if who is not None:
            raise OSError(errno.EPERM, f"is writable by {who}", str(path))
        data = handle.read(MAX_SCRIPT_BYTES + 1)
    if len(data) > MAX_SCRIPT_BYTES:
        raise OSError(errno.EFBIG, f"is larger than {MAX_SCRIPT_BYTES} bytes", str(path))
    # Imported here: OpenSSL's hashes cost milliseconds that stop never needs.
    import hashlib

    return ScriptText(data, hashlib.sha256(data).hexdigest())


def source_digest(script: Script) -> str:
    """The SHA-256 of ``script``'s text now; ``""`` for a cache-only script.

    An unreadable script gets a value no record holds, so its cache is stale
    and the compile that follows says why.
    """
    if script.source is None:
        return ""
    try:
        return read_script(script.source).digest
    except OSError as error:
        return f"unreadable: {error.strerror}"


def wanted_record(script: Script, kernel: KernelIdentity) -> CacheRecord:
    """The record a valid cache of ``script`` for ``kernel`` must carry."""
    return CacheRecord(
        kernel, script.runtime, tuple(script.recorded_options), source_digest(script)
    )


def compile_command(
    stap: str, script: Script, release: str, source: Path | None = None
) -> list[str]:
    """``stap -p4 -m NAME -r RELEASE [--runtime=bpf] OPTS FILE``.

    ``source`` is the file compiled (the private copy); by default the script's own.
    """
    compiled = source or script.source
    assert compiled is not None
    argv = [stap, "-p4", "-m", script.name, "-r", release]
    if script.runtime == "bpf":
        argv.append("--runtime=bpf")
    return [*argv, *script.compile_options, str(compiled)]


def failure_line(output: str, returncode: int) -> str:
    """The line of stap's messages that says why a compile failed (one line, for the console)."""
    missing = _NO_BUILD_TREE.search(output)
    if missing is not None:
        release = missing.group(1)
        return (
            f"no kernel headers for {release}: stap needs /lib/modules/{release}/build; "
            f"install them (Debian: apt-get install linux-headers-{release})"
        )
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        lowered = line.lower()
        if "error" in lowered and not lowered.startswith("pass "):
            return line
    return lines[-1] if lines else f"stap exited with status {returncode}"


def compile_one(
    stap: str,
    script: Script,
    kernel: KernelIdentity,
    cache_dir: Path,
    temp_path: Path,
    timeout: float = DEFAULT_TIMEOUT,
    interrupted: Callable[[], bool] | None = None,
) -> CompileResult:
    """Compile a private copy of one script and install it into ``cache_dir``.

    ``stap`` gets ``timeout`` seconds (``COMPILE_TIMEOUT``) and is stopped
    early when ``interrupted()`` turns true (a SIGTERM to the service).
    """
    # Imported here: they pull in much of the standard library, and most
    # commands (status, stop, a warm start) never compile.
    import shutil
    import tempfile

    if script.source is None:
        return CompileResult(script.name, False, "cache-only script: there is no .stp to compile")
    try:
        text = read_script(script.source)
    except OSError as error:
        return CompileResult(script.name, False, f"cannot read {script.source}: {error.strerror}")
    try:
        workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{script.name}-", dir=temp_path))
        held = _hold(workdir)
    except OSError as error:
        return CompileResult(
            script.name, False, f"cannot use TEMP_PATH {temp_path}: {error.strerror}"
        )
    try:
        copy = workdir / f"{script.name}.stp"
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.data)
        argv = compile_command(stap, script, kernel.release, copy)
        shown = tuple(compile_command(stap, script, kernel.release))
        # stap's own temporary files go to the private directory too.
        env = {**tool_environment(os.environ, os.geteuid()), "TMPDIR": str(workdir)}
        try:
            done = process.run(argv, timeout, env=env, cwd=str(workdir), interrupted=interrupted)
        except OSError as error:
            return CompileResult(script.name, False, f"cannot run {stap}: {error.strerror}")
        except process.TimedOut as error:
            why = (
                "interrupted; stopped stap"
                if interrupted is not None and interrupted()
                else f"stap did not finish within {timeout:g}s (COMPILE_TIMEOUT); stopped it"
            )
            return CompileResult(script.name, False, why, shown, error.output)
        # Messages name the script's own file, not the private copy.
        output = done.stdout.replace(str(copy), str(script.source))
        if done.returncode != 0:
            summary = failure_line(output, done.returncode)
            return CompileResult(script.name, False, summary, shown, output)
        built = workdir / f"{script.name}{script.module_suffix}"
        if not built.is_file():
            summary = f"stap did not produce {built.name}"
            return CompileResult(script.name, False, summary, shown, output)
        record = CacheRecord(kernel, script.runtime, tuple(script.recorded_options), text.digest)
        try:
            cache.install(cache_dir, script.name, script.module_suffix, built, record)
        except OSError as error:
            summary = f"cannot write cache {cache_dir}: {error.strerror}"
            return CompileResult(script.name, False, summary, shown, output)
        return CompileResult(script.name, True, "compiled", shown, output)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        os.close(held)


#: Compiles work in TEMP_PATH/stap-NAME-XXXXXXXX (mkdtemp: 0700, ours alone).
WORKDIR_PREFIX = "stap-"


def _hold(workdir: Path) -> int:
    """Lock ``workdir`` for as long as the returned descriptor is open (flock(2)).

    A compile killed with SIGKILL loses the lock with its process, which is
    how :func:`remove_leftovers` tells an abandoned directory from a busy one.
    """
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_leftovers(temp_path: Path) -> list[Path]:
    """Remove the work directories earlier compiles were killed before removing.

    Only ours: real directories (not links) named ``stap-NAME-*``, owned by
    this user, and locked by no running compile. Returns what was removed.
    """
    import shutil

    removed: list[Path] = []
    try:
        entries = list(os.scandir(temp_path))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name.removeprefix(WORKDIR_PREFIX)
        script, dash, _ = name.rpartition("-")
        if name == entry.name or not dash or not is_valid_name(script):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # gone, a link, or not a directory
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a running compile holds it
        finally:
            os.close(fd)
        # rmtree works through directory descriptors: a link planted inside
        # is removed, never followed.
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def compile_many(
    stap: str,
    scripts: Sequence[Script],
    kernel: KernelIdentity,
    cache_dir: Path,
    temp_path: Path,
    timeout: float = DEFAULT_TIMEOUT,
    interrupted: Callable[[], bool] | None = None,
) -> list[CompileResult]:
    """Compile ``scripts`` in parallel (at most one per CPU); results in input order."""

    def one(script: Script) -> CompileResult:
        return compile_one(stap, script, kernel, cache_dir, temp_path, timeout, interrupted)

    if scripts:
        remove_leftovers(temp_path)

    return parallel_map(one, scripts, os.cpu_count() or 1)
