"""Compiling scripts into the cache with the real ``stap -p4`` (spec §2.2.5).

Each compile runs in a fresh directory under ``TEMP_PATH`` and its result is
moved into the cache only when complete. Independent compiles run in
parallel: after a kernel update every script needs one.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from stapinit.initscript import cache
from stapinit.initscript.cache import CacheRecord, KernelIdentity
from stapinit.initscript.scripts import Script


class CompileResult(NamedTuple):
    """The outcome of one compile; the caller logs it."""

    name: str
    ok: bool
    summary: str  # one line for the console
    argv: tuple[str, ...] = ()
    output: str = ""  # stap's stdout and stderr, for the log


def wanted_record(script: Script, kernel: KernelIdentity) -> CacheRecord:
    """The record a valid cache of ``script`` for ``kernel`` must carry."""
    return CacheRecord(kernel, script.runtime, tuple(script.compile_options))


def compile_command(stap: str, script: Script, release: str) -> list[str]:
    """``stap -p4 -m NAME -r RELEASE [--runtime=bpf] OPTS FILE``."""
    assert script.source is not None
    argv = [stap, "-p4", "-m", script.name, "-r", release]
    if script.runtime == "bpf":
        argv.append("--runtime=bpf")
    return [*argv, *script.compile_options, str(script.source)]


def _failure_line(stderr: str, returncode: int, release: str) -> str:
    """The line of stap's output that says why it failed, for the console.

    stap refuses everything, BPF scripts too, without the release's build tree
    (``Checking "/lib/modules/R/build/.config" failed with error: ...``), which a
    fresh install meets first: that line is replaced by what to install.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(f'Checking "/lib/modules/{release}/build/.config" failed'):
            return (
                f"no kernel headers for {release}: stap needs /lib/modules/{release}/build; "
                f"install them (Debian: apt-get install linux-headers-{release})"
            )
    for line in lines:
        lowered = line.lower()
        if "error" in lowered and not lowered.startswith("pass "):
            return line
    return lines[-1] if lines else f"stap exited with status {returncode}"


def compile_one(
    stap: str, script: Script, kernel: KernelIdentity, cache_dir: Path, temp_path: Path
) -> CompileResult:
    """Compile one script and install it into ``cache_dir``."""
    # Imported here: they pull in much of the standard library, and most
    # commands (status, stop, a warm start) never compile.
    import shutil
    import tempfile

    if script.source is None:
        return CompileResult(script.name, False, "cache-only script: there is no .stp to compile")
    argv = compile_command(stap, script, kernel.release)
    try:
        workdir = Path(tempfile.mkdtemp(prefix=f"stap-{script.name}-", dir=temp_path))
    except OSError as error:
        return CompileResult(script.name, False, f"cannot use TEMP_PATH {temp_path}: {error}")
    try:
        try:
            done = subprocess.run(
                argv, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, text=True
            )
        except OSError as error:
            return CompileResult(script.name, False, f"cannot run {stap}: {error.strerror}")
        output = done.stdout + done.stderr
        if done.returncode != 0:
            summary = _failure_line(done.stderr, done.returncode, kernel.release)
            return CompileResult(script.name, False, summary, tuple(argv), output)
        built = workdir / f"{script.name}{script.module_suffix}"
        if not built.is_file():
            summary = f"stap did not produce {built.name}"
            return CompileResult(script.name, False, summary, tuple(argv), output)
        try:
            cache.install(
                cache_dir, script.name, script.module_suffix, built, wanted_record(script, kernel)
            )
        except OSError as error:
            summary = f"cannot write cache {cache_dir}: {error.strerror}"
            return CompileResult(script.name, False, summary, tuple(argv), output)
        return CompileResult(script.name, True, "compiled", tuple(argv), output)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def compile_many(
    stap: str,
    scripts: Sequence[Script],
    kernel: KernelIdentity,
    cache_dir: Path,
    temp_path: Path,
) -> list[CompileResult]:
    """Compile ``scripts`` in parallel (at most one per CPU); results in input order."""
    if not scripts:
        return []
    # Imported here: it pulls in logging, and most commands never compile.
    from concurrent.futures import ThreadPoolExecutor

    workers = min(len(scripts), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: compile_one(stap, s, kernel, cache_dir, temp_path), scripts))
