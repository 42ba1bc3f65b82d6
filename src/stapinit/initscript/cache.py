"""The compiled-script cache (spec §3.4, §2.2.1).

``CACHE_PATH/<release>/NAME.ko`` (or ``NAME.bo``) is the module and
``NAME.opts`` records what it was built from: the kernel identity and the
compile options. A module is reused until the script, its options or the
kernel change.

One deliberate change from upstream, which compared ``uname -a``: the host
name is not part of the identity, so caches built on one machine serve an
identical one (spec §5.8).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import NamedTuple

from stapinit.core.fsutil import atomic_copy, atomic_write

RECORD_HEADER = "# systemtap-service cache record; do not edit"


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

    def to_text(self) -> str:
        """Serialise as ``key=value`` lines, options shell-quoted."""
        return (
            f"{RECORD_HEADER}\n"
            f"release={self.kernel.release}\n"
            f"version={self.kernel.version}\n"
            f"machine={self.kernel.machine}\n"
            f"runtime={self.runtime}\n"
            f"options={shlex.join(self.options)}\n"
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


def staleness(
    state: CacheState,
    wanted: CacheRecord,
    source_mtime: float | None,
) -> str | None:
    """Why the cache cannot be used, or ``None`` when it is valid.

    ``source_mtime`` is the ``.stp`` file's modification time (``None`` for a
    cache-only script, which is judged by its record alone).
    """
    if state.module_mtime is None:
        return "no compiled module"
    if not state.record_present:
        return "no .opts record"
    record = state.record
    if record is None:
        return "unreadable .opts record"
    if source_mtime is not None and source_mtime > state.module_mtime:
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


def record_path(directory: Path, name: str) -> Path:
    """The ``.opts`` record of ``name`` in a release's cache directory."""
    return directory / f"{name}.opts"


def inspect(directory: Path, name: str, suffix: str) -> CacheState:
    """Read what the cache holds for one script."""
    try:
        module_mtime: float | None = module_path(directory, name, suffix).stat().st_mtime
    except OSError:
        module_mtime = None
    try:
        text = record_path(directory, name).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CacheState(module_mtime, None, False)
    return CacheState(module_mtime, CacheRecord.from_text(text), True)


def install(
    directory: Path, name: str, suffix: str, built_module: Path, record: CacheRecord
) -> None:
    """Move a freshly built module and its record into the cache.

    The old record goes first and the new one last, each by rename: whatever
    moment this is interrupted at, the cache never holds a module with a
    record that vouches for it wrongly, so a later start never loads it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    record_file = record_path(directory, name)
    record_file.unlink(missing_ok=True)
    for other in {".ko", ".bo"} - {suffix}:  # the script changed runtime
        module_path(directory, name, other).unlink(missing_ok=True)
    atomic_copy(built_module, module_path(directory, name, suffix))
    atomic_write(record_file, record.to_text().encode())


def remove(directory: Path, name: str) -> list[Path]:
    """Delete a script's cache files (any runtime); return what was removed."""
    removed = []
    for path in (directory / f"{name}.ko", directory / f"{name}.bo", record_path(directory, name)):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def cached_files(directory: Path, name: str) -> list[Path]:
    """The cache files that exist for ``name``."""
    candidates = (directory / f"{name}.ko", directory / f"{name}.bo", record_path(directory, name))
    return [path for path in candidates if path.exists()]
