"""Reading files in directories others might reach, without being led astray.

A name in a shared or service directory may be a symlink to ``/dev/zero``, a
FIFO that blocks forever, or a huge file. :func:`read_regular` opens without
following a final symlink and without blocking, checks it is a regular file
and reads at most ``limit`` bytes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class NotRegularFile(OSError):
    """The path is a symlink, FIFO, device or directory; ``str()`` names it."""


class TooLarge(OSError):
    """The file is larger than the caller allows; ``str()`` names it."""


def read_regular(path: Path | str, limit: int, follow_links: bool = False) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``).

    Raises :class:`NotRegularFile` for anything but a regular file (a final
    symlink included, unless ``follow_links``: for files whose whole path
    was judged already), :class:`TooLarge` above ``limit`` bytes, and the
    usual :class:`OSError` (``FileNotFoundError`` …) otherwise.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags if follow_links else flags | os.O_NOFOLLOW)
    except OSError as error:
        if error.errno == 40:  # ELOOP: the last component is a symlink
            raise NotRegularFile(error.errno, "is a symbolic link", str(path)) from None
        raise
    try:
        facts = os.fstat(fd)
        if not stat.S_ISREG(facts.st_mode):
            raise NotRegularFile(0, "is not a regular file", str(path))
        if facts.st_size > limit:
            raise TooLarge(0, f"is larger than {limit} bytes", str(path))
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := os.read(fd, min(1 << 16, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise TooLarge(0, f"is larger than {limit} bytes", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)
