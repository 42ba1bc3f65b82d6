"""Small file-system helpers shared by every command.

Only ``os`` is imported: the boot-time command uses these, and ``tempfile``
and ``shutil`` would pull in much of the standard library.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_counter = itertools.count()


def _write_temp(path: Path, fill: Callable[[BinaryIO], object], mode: int, durable: bool) -> Path:
    temp = path.with_name(f".{path.name}.{os.getpid()}.{next(_counter)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            # The umask may have narrowed the mode. By descriptor, never by path: whoever
            # can write the directory could have swapped a symlink in at ``temp`` by now.
            os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _replace_through_temp(
    path: Path, fill: Callable[[BinaryIO], object], mode: int, durable: bool
) -> None:
    temp = _write_temp(path, fill, mode, durable)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def stage_write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` durably to a new hidden temp file beside ``path``; return the temp.

    The caller renames it onto ``path`` with ``os.replace`` (or unlinks it)
    later, so that several files can be staged first and installed together.
    """
    return _write_temp(path, lambda handle: handle.write(data), mode, durable=True)


def atomic_write(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temp file in the same directory.

    Readers see the old file or the new one, never a part of it. ``durable``
    also flushes it to disk first; files that do not outlive a reboot (status
    files in /run) skip that cost.
    """
    _replace_through_temp(path, lambda handle: handle.write(data), mode, durable)


def atomic_copy(source: Path, path: Path, mode: int = 0o644) -> None:
    """Copy ``source`` to ``path`` atomically, even across file systems."""

    def copy(handle: BinaryIO) -> None:
        with source.open("rb") as original:
            while chunk := original.read(1 << 20):
                handle.write(chunk)

    _replace_through_temp(path, copy, mode, durable=True)


def set_mode(path: Path, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Set ``path``'s mode (and ``(uid, gid)`` owner) through a descriptor.

    A symlink at ``path`` is an error (OSError ELOOP), never followed: whoever
    can write the directory could have put one there since ``path`` was made.
    For directories and regular files; a FIFO is opened without blocking.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)
