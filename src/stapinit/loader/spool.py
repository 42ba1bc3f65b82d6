"""Receiving a client's module: into a private file as it arrives, within a shared budget.

A client's header announces how big its module is; nothing is set aside for
that announcement. The bytes go to a file in the session's private directory
(mode 0700, root's) as they arrive, so the loader's memory does not grow with
what a client claims or sends, and every byte held is counted against one
limit shared by all sessions (``spool_limit``), from its arrival until the
session ends. A client that would go past it is refused as "busy".
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from stapinit import loader_wire as wire
from stapinit.core.errors import StapinitError


class SpoolFull(StapinitError):
    """Taking more bytes would go past the loader's ``spool_limit``."""


class SpoolBudget:
    """Bytes of module data held across all sessions, and the most that may be."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> None:
        """Count ``count`` more bytes; raise :class:`SpoolFull` (counting none) past the limit."""
        with self._lock:
            if self._used + count > self.limit:
                raise SpoolFull(
                    f"stap-loader is busy (it holds {self._used} bytes of modules, "
                    f"its limit is {self.limit}); try again later"
                )
            self._used += count

    def give_back(self, count: int) -> None:
        """Stop counting ``count`` bytes."""
        with self._lock:
            self._used -= count


class Holding:
    """What one session holds of a :class:`SpoolBudget`; all given back by :meth:`release`."""

    def __init__(self, budget: SpoolBudget) -> None:
        self.budget = budget
        self.count = 0

    def take(self, count: int) -> None:
        """Hold ``count`` more bytes (:class:`SpoolFull` past the limit)."""
        self.budget.take(count)
        self.count += count

    def release(self) -> None:
        """Give back everything held."""
        self.budget.give_back(self.count)
        self.count = 0


@dataclass(frozen=True)
class SpooledRequest:
    """A load request received whole: the module in a private file, its signature in memory."""

    module_name: str
    module_path: Path
    signature: bytes | None

    @contextlib.contextmanager
    def module_bytes(self) -> Iterator[bytes]:
        """The module's bytes, mapped read-only from its private file (for its checks).

        A mapping, not a copy: the pages are the file's own (already in the
        page cache from being written), so checking a module costs no memory
        of its size. It behaves as ``bytes`` for what the checks do with it
        (hashing, slicing, ``struct.unpack_from``).
        """
        with (
            open(self.module_path, "rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
        ):
            yield cast(bytes, mapped)


def receive_request(
    conn: socket.socket,
    deadline: float,
    workdir: Path,
    holding: Holding,
    max_module: int,
) -> SpooledRequest | None:
    """Read a ``load`` request from ``conn``: the module into ``workdir/NAME``.

    None if the client closed the connection before sending anything. Raises
    :class:`wire.WireError` for a malformed request, :class:`SpoolFull` when
    its bytes would go past the budget, TimeoutError past ``deadline``
    (``time.monotonic()``). ``workdir`` must be private: the file is created
    there without following links and never replaced.
    """
    head = wire.read_header(conn, deadline)
    if head is None:
        return None
    header, size = head
    load = wire.parse_load_header(header, size, max_module)
    module_path = workdir / load.module_name
    fd = os.open(
        module_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:

        def to_file(data: bytes) -> None:
            holding.take(len(data))
            view = memoryview(data)
            while view:  # written as it arrives: nothing waits in a buffer
                view = view[os.write(fd, view) :]

        wire.copy_payload(conn, load.module_size, deadline, to_file)
    finally:
        os.close(fd)
    signature: bytes | None = None
    if load.signature_size is not None:
        parts: list[bytes] = []

        def to_memory(data: bytes) -> None:
            holding.take(len(data))
            parts.append(data)

        wire.copy_payload(conn, load.signature_size, deadline, to_memory)
        signature = b"".join(parts)
    return SpooledRequest(load.module_name, module_path, signature)
