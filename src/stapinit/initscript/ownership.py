"""Refuse to run as root on files and directories another user can change.

Run as root, systemtap-service executes what its configuration names
(``STAP``, ``STAPRUN``, ``STAPBPF`` and the options given to them), compiles
the scripts of ``SCRIPT_PATH``, loads the modules of ``CACHE_PATH`` and
writes under ``STAT_PATH``. Whoever can write any of those, or a directory
holding them, could make root run what they like. So, as root, every one of
them must be owned by root and writable by no group and no other user.

The rule is a pure function of ``(st_uid, st_mode)``; the I/O around it only
stats paths. A path that does not exist yet passes: root creates it later.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from stapinit.core.errors import StapinitError
from stapinit.core.lsb import EXIT_NOT_CONFIGURED
from stapinit.initscript.settings import Settings


class UntrustedPathError(StapinitError):
    """A path root would rely on is writable by someone else; str() is one line (exit 6)."""

    exit_code = EXIT_NOT_CONFIGURED


def writable_by(uid: int, mode: int, sticky_ok: bool = False) -> str | None:
    """Who besides root can change a path with owner ``uid`` and ``mode``, or None.

    ``"uid N"`` for an owner other than root (an owner may always chmod),
    else ``"others"`` or ``"group"`` for the write bits. ``sticky_ok``
    accepts a root-owned sticky directory such as ``/tmp``: others may add
    entries there but cannot rename or remove root's.
    """
    if uid != 0:
        return f"uid {uid}"
    if sticky_ok and stat.S_ISDIR(mode) and mode & stat.S_ISVTX:
        return None
    if mode & stat.S_IWOTH:
        return "others"
    if mode & stat.S_IWGRP:
        return "group"
    return None


def _tool_paths(tool: str) -> Iterator[Path]:
    # A bare name is found on root's PATH, which is root's own business.
    if os.path.isabs(tool):
        path = Path(os.path.normpath(tool))
        yield path.parent
        yield path


def _directory_and_entries(directory: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    yield directory
    try:
        with os.scandir(directory) as entries:
            names = sorted(entry.name for entry in entries if entry.name.endswith(suffixes))
    except OSError:
        return
    for name in names:
        yield directory / name


def trusted_paths(settings: Settings, releases: Iterable[str]) -> list[tuple[Path, bool]]:
    """Every path root relies on, with whether a sticky world-writable directory is fine.

    The configuration files read, the configuration, script, cache and status
    directories (with the scripts and the caches of ``releases``), and the
    tools given as absolute paths with their directories.
    """
    paths: list[tuple[Path, bool]] = [(path, False) for path in settings.files_read]
    paths.append((settings.config_path, False))
    paths += [(path, False) for path in _directory_and_entries(settings.script_path, (".stp",))]
    paths.append((settings.cache_path, False))
    for release in dict.fromkeys(releases):
        cached = _directory_and_entries(settings.cache_path / release, (".ko", ".bo", ".opts"))
        paths += [(path, False) for path in cached]
    paths.append((settings.stat_path, False))
    # Compiles make their own private (mkdtemp, 0700) directory in TEMP_PATH.
    paths.append((settings.temp_path, True))
    for tool in (settings.stap, settings.staprun, settings.stapbpf):
        paths += [(path, False) for path in _tool_paths(tool)]
    return paths


def check_paths(paths: Iterable[tuple[Path, bool]]) -> None:
    """Raise :class:`UntrustedPathError` for the first path another user can change."""
    for path, sticky_ok in paths:
        try:
            facts = os.stat(path)
        except OSError:
            continue  # missing: root creates it later; unreadable: it fails later, loudly
        who = writable_by(facts.st_uid, facts.st_mode, sticky_ok)
        if who is not None:
            raise UntrustedPathError(f"refusing to run as root: {path} is writable by {who}")


def shutdown_paths(settings: Settings) -> list[tuple[Path, bool]]:
    """What ``stop`` relies on: the configuration, the status records and ``STAPRUN``."""
    paths: list[tuple[Path, bool]] = [(path, False) for path in settings.files_read]
    paths.append((settings.config_path, False))
    paths.append((settings.stat_path, False))
    paths += [(path, False) for path in _tool_paths(settings.staprun)]
    return paths


def check_root_ownership(
    settings: Settings, release: str | None = None, shutdown_only: bool = False
) -> None:
    """As root (euid 0), refuse paths others can change; otherwise check nothing.

    ``release`` is the ``-r`` release, checked with the running kernel's.
    ``shutdown_only`` checks only :func:`shutdown_paths`.
    """
    if os.geteuid() != 0:
        return
    if shutdown_only:
        check_paths(shutdown_paths(settings))
        return
    releases = [os.uname().release] + ([release] if release else [])
    check_paths(trusted_paths(settings, releases))
