"""The compile sandbox: what stap, gcc and make can see while they compile a request.

A compile runs the client's choices through stap, gcc and make: an ``@cast``
header is compiled by gcc (``@cast(p, "t", "</any/file>")`` made gcc echo the
server's log), a ``stapdev -g`` script carries C that gcc includes, a
``process("/path")`` probe makes stap open a path.  So every compile runs in
a bubblewrap sandbox (bwrap(1), Debian package ``bubblewrap``; the tool
Flatpak uses, kept by the same people) that shows it only what a compile
needs, read-only: ``/usr`` and the merged-``/usr`` links (``/bin``, ``/lib``,
...), the dynamic loader's files of ``/etc``, the served kernels' build trees
and ``/boot`` files, the stap executable; plus a private ``/proc``, ``/dev``
and ``/tmp`` and the compile's own directory (``/stap-compile``, writable).
Nothing of the server's state (identity, cache, other compiles), its log,
``/home``, ``/root`` or the rest of ``/etc``, ``/var``, ``/run``, ``/srv`` is
there: a path outside is "No such file or directory", whether it exists or
not.  All namespaces are new (no network, no other processes to see or
signal, no System V IPC), it cannot make further user namespaces, it has no
controlling terminal (``--new-session``), and it dies with the server's child
that started it (``--die-with-parent``).

bwrap is not setuid on Debian: it needs unprivileged user namespaces, and the
server checks at start (running ``stap -V`` inside) that it gets them as the
user compiles run as; without them the server does not start, rather than
compile unconfined.  ``SANDBOX=no`` turns the sandbox off on purpose (a
warning at every start says so).

Pure, except :func:`host_entries`, which looks at the host's file system.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Final

#: Where the compile's own directory appears inside the sandbox.
INSIDE_WORKDIR: Final = "/stap-compile"
#: Host trees a compile reads (compilers, headers, tapsets, the systemtap runtime).
SYSTEM_TREES: Final = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: The files of /etc that the dynamic loader and the compiler driver read.
ETC_ENTRIES: Final = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
)
#: Per served release, the /boot files stap reads for kernel symbols and config.
BOOT_FILES: Final = ("config-{}", "System.map-{}", "vmlinux-{}", "vmlinuz-{}")


@dataclass(frozen=True)
class HostEntry:
    """A host path to show inside: a directory or file (bound read-only) or a symlink."""

    path: str
    link_target: str | None = None  # set for a symlink, recreated as such inside


def _covered(path: str, bound: Iterable[str]) -> bool:
    pure = PurePosixPath(path)
    return any(pure == PurePosixPath(b) or PurePosixPath(b) in pure.parents for b in bound)


def mount_arguments(entries: Sequence[HostEntry]) -> list[str]:
    """The bwrap file-system arguments for ``entries`` (in order; duplicates dropped).

    A path already inside a bound directory is not bound again.
    """
    args: list[str] = []
    bound: list[str] = []
    for entry in entries:
        if _covered(entry.path, bound):
            continue
        if entry.link_target is not None:
            args += ["--symlink", entry.link_target, entry.path]
        else:
            args += ["--ro-bind", entry.path, entry.path]
        bound.append(entry.path)
    return args


def sandbox_command(
    bwrap: str, mounts: Sequence[str], workdir: str, argv: Sequence[str]
) -> list[str]:
    """``bwrap ... -- ARGV``: run ``argv`` in ``workdir``'s ``build`` directory, sandboxed.

    ``workdir`` (on the host) appears as :data:`INSIDE_WORKDIR`, writable; see
    the module's description for the rest.
    """
    return [
        bwrap,
        "--unshare-all",
        # Explicit: a user namespace even when run as root.  Not --disable-userns:
        # it must write /proc/sys, which systemd's ProtectKernelTunables= makes
        # read-only, and USER may make user namespaces outside the sandbox anyway.
        "--unshare-user",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "stap-compile",
        # The private trees first: a host path bound below /tmp stays visible.
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        *mounts,
        "--bind",
        workdir,
        INSIDE_WORKDIR,
        "--chdir",
        f"{INSIDE_WORKDIR}/build",
        "--",
        *argv,
    ]


def _entry(path: str) -> HostEntry | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return HostEntry(path, os.readlink(path))
    return HostEntry(path)


def host_entries(
    releases: Sequence[str], executables: Sequence[str], extra: Sequence[str] = ()
) -> list[HostEntry]:
    """What of this host a compile for ``releases`` with ``executables`` sees.

    The system trees and ``/etc`` entries that exist; each release's
    ``/lib/modules/REL`` with the real locations of its ``build`` and ``source``
    links (they may lie outside ``/usr``) and its ``/boot`` files; the real
    locations of ``executables`` (stap, which may be a wrapper elsewhere); the
    ``extra`` paths the administrator added (``SANDBOX_PATHS``).
    """
    candidates = [*SYSTEM_TREES, *ETC_ENTRIES]
    for release in releases:
        modules = f"/lib/modules/{release}"
        candidates.append(modules)
        candidates += [os.path.realpath(f"{modules}/{link}") for link in ("build", "source")]
        candidates += [f"/boot/{name.format(release)}" for name in BOOT_FILES]
    candidates += [os.path.realpath(path) for path in executables]
    candidates += extra
    entries = []
    for path in candidates:
        entry = _entry(path)
        if entry is not None:
            entries.append(entry)
    return entries


@dataclass(frozen=True)
class Sandbox:
    """The bwrap executable and the file-system arguments for this host."""

    bwrap: str
    mounts: tuple[str, ...]

    def command(self, workdir: str, argv: Sequence[str]) -> list[str]:
        """See :func:`sandbox_command`."""
        return sandbox_command(self.bwrap, self.mounts, workdir, argv)


def find_sandbox(
    releases: Sequence[str], executables: Sequence[str], extra: Sequence[str] = ()
) -> Sandbox | None:
    """The sandbox for this host (see :func:`host_entries`), or None without bwrap."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    return Sandbox(bwrap, tuple(mount_arguments(host_entries(releases, executables, extra))))
