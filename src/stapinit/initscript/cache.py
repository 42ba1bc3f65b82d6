"""The compiled-script cache (spec §3.4, §2.2.1).

``CACHE_PATH/<release>/NAME.ko`` (or ``NAME.bo``) is the module and
``NAME.opts`` records what it was built from: the kernel identity, the
compile options that change the module (phase ``COMPILE`` of
:mod:`stapinit.initscript.options`) and the SHA-256 of the very script text
compiled. A module is reused until the script's text, those options or the
kernel change: not when a script is only touched, nor when a run-time option
such as ``-S`` or ``-o`` changes.

One deliberate change from upstream, which compared ``uname -a``: the host
name is not part of the identity, so caches built on one machine serve an
identical one (spec §5.8).
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path
from typing import NamedTuple

from stapinit.core.fsutil import atomic_copy, atomic_write
from stapinit.core.safeio import read_regular

RECORD_HEADER = "# systemtap-service cache record; do not edit"
# A compile server's signature of a module, NAME.ko.sgn or NAME.bo.sgn
# (the suffix stapinit.trust.signing writes; not imported: it needs crypto).
SIGNATURE_SUFFIX = ".sgn"
#: A record is a few lines; anything larger is not one of ours.
MAX_RECORD_BYTES = 64 * 1024


class KernelIdentity(NamedTuple):
    """What a module is tied to: ``uname -r``, ``uname -v`` and ``uname -m``.

    ``version`` is empty when compiling for a kernel that is not running
    (``compile -r``): it cannot be known then, and is not compared.
    """

    release: str
    version: str
    machine: str


class CacheRecord(NamedTuple):
    """The contents of a ``NAME.opts`` file."""

    kernel: KernelIdentity
    runtime: str
    options: tuple[str, ...]
    # SHA-256 (hex) of the script text compiled; "" when unknown (a record
    # written before digests, or the wanted record of a cache-only script).
    source: str = ""

    def to_text(self) -> str:
        """Serialise as ``key=value`` lines, options shell-quoted."""
        return (
            f"{RECORD_HEADER}\n"
            f"release={self.kernel.release}\n"
            f"version={self.kernel.version}\n"
            f"machine={self.kernel.machine}\n"
            f"runtime={self.runtime}\n"
            f"options={shlex.join(self.options)}\n"
            f"source={self.source}\n"
        )

    @classmethod
    def from_text(cls, text: str) -> CacheRecord | None:
        """Parse a record; ``None`` when it is not one we wrote (treated as stale)."""
        fields: dict[str, str] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                return None
            fields[key] = value
        try:
            return cls(
                KernelIdentity(fields["release"], fields["version"], fields["machine"]),
                fields["runtime"],
                tuple(shlex.split(fields["options"])),
                fields.get("source", ""),
            )
        except (KeyError, ValueError):
            return None


def running_kernel() -> KernelIdentity:
    """The identity of the kernel this process runs on."""
    uname = os.uname()
    return KernelIdentity(uname.release, uname.version, uname.machine)


def target_kernel(release: str | None) -> KernelIdentity:
    """The identity to compile for: the running kernel, or ``release`` on this machine."""
    running = running_kernel()
    if release is None or release == running.release:
        return running
    return KernelIdentity(release, "", running.machine)


class CacheState(NamedTuple):
    """What is on disk for one script, gathered by :func:`inspect`."""

    module_mtime: float | None
    record: CacheRecord | None
    record_present: bool


def staleness(state: CacheState, wanted: CacheRecord) -> str | None:
    """Why the cache cannot be used, or ``None`` when it is valid.

    The script is judged by its text's digest (``wanted.source``; empty for a
    cache-only script, judged by its record alone), never by time stamps.
    """
    if state.module_mtime is None:
        return "no compiled module"
    if not state.record_present:
        return "no .opts record"
    record = state.record
    if record is None:
        return "unreadable .opts record"
    if wanted.source and record.source != wanted.source:
        return "script changed"
    if record.runtime != wanted.runtime or record.options != wanted.options:
        return "options changed"
    have, want = record.kernel, wanted.kernel
    if have.release != want.release or have.machine != want.machine:
        return "kernel changed"
    if have.version and want.version and have.version != want.version:
        return "kernel changed"
    return None


def module_path(directory: Path, name: str, suffix: str) -> Path:
    """The module file of ``name`` in a release's cache directory."""
    return directory / f"{name}{suffix}"


def signature_path(directory: Path, name: str, suffix: str) -> Path:
    """The ``.sgn`` signature of ``name``'s module, when a compile server signed it."""
    return directory / f"{name}{suffix}{SIGNATURE_SUFFIX}"


def record_path(directory: Path, name: str) -> Path:
    """The ``.opts`` record of ``name`` in a release's cache directory."""
    return directory / f"{name}.opts"


def inspect(directory: Path, name: str, suffix: str) -> CacheState:
    """Read what the cache holds for one script.

    Only regular files count: a module that is a symbolic link, directory or
    FIFO is no module, and a record that is one (or is too large) is
    unreadable; either way the script is compiled again.
    """
    try:
        facts = module_path(directory, name, suffix).lstat()
        module_mtime = facts.st_mtime if stat.S_ISREG(facts.st_mode) else None
    except OSError:
        module_mtime = None
    try:
        data = read_regular(record_path(directory, name), MAX_RECORD_BYTES)
    except FileNotFoundError:
        return CacheState(module_mtime, None, False)
    except OSError:
        return CacheState(module_mtime, None, True)
    record = CacheRecord.from_text(data.decode("utf-8", errors="replace"))
    return CacheState(module_mtime, record, True)


def install(
    directory: Path,
    name: str,
    suffix: str,
    built_module: Path,
    record: CacheRecord,
    signature: bytes | None = None,
) -> None:
    """Move a freshly built module, its signature (if any) and its record into the cache.

    The old record and signature go first and the new record last, each by
    rename: whatever moment this is interrupted at, the cache never holds a
    module with a record that vouches for it wrongly, so a later start never
    loads it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    record_file = record_path(directory, name)
    record_file.unlink(missing_ok=True)
    for other in (".ko", ".bo"):
        signature_path(directory, name, other).unlink(missing_ok=True)
        if other != suffix:  # the script changed runtime
            module_path(directory, name, other).unlink(missing_ok=True)
    atomic_copy(built_module, module_path(directory, name, suffix))
    if signature is not None:
        atomic_write(signature_path(directory, name, suffix), signature)
    atomic_write(record_file, record.to_text().encode())


def _is_entry(path: Path) -> bool:
    """A cache file of ours, or a link in its place; never a directory named like one."""
    try:
        return not stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def remove(directory: Path, name: str) -> list[Path]:
    """Delete a script's cache files (any runtime); return what was removed.

    A symbolic link is removed itself, never what it points to; a directory
    named like a cache file is not ours and is left alone.
    """
    removed = []
    for path in cached_files(directory, name):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def cached_files(directory: Path, name: str) -> list[Path]:
    """The cache files that exist for ``name`` (see :func:`remove`)."""
    return [path for path in _files_of(directory, name) if _is_entry(path)]


def _files_of(directory: Path, name: str) -> tuple[Path, ...]:
    modules = (module_path(directory, name, ".ko"), module_path(directory, name, ".bo"))
    signatures = tuple(signature_path(directory, name, s) for s in (".ko", ".bo"))
    return (*modules, *signatures, record_path(directory, name))
