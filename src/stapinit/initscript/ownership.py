"""Refuse to run as root on files that another user can change, or swap.

Run as root, systemtap-service executes what its configuration names
(``STAP``, ``STAPRUN``, ``STAPBPF``), compiles the scripts of ``SCRIPT_PATH``
with the tapsets and sources their options name (``-I``, ``-R``,
``--sysroot``, ``-d``), loads the modules of ``CACHE_PATH``, writes under
``STAT_PATH``, ``TEMP_PATH``, ``LOG_FILE`` and the ``-o`` files of its
scripts. Whoever can change any of them, or rename or replace any directory
on the way to them, could make root run what they like (issue 10: a user who
owned a directory above ``SCRIPT_PATH`` exchanged ``script.d`` with their own
while root compiled).

So, as OpenSSH's ``StrictModes`` and sudo do, each such path is judged with
every directory above it up to ``/``, symbolic links followed as the kernel
does (path_resolution(7)), each one:

- owned by root and writable by neither its group nor others;
- except a root-owned sticky directory such as ``/tmp`` on the way: others may
  add entries there but cannot rename or remove root's (sticky bit,
  inode(7)), so the entry that comes next must exist and be root's; and
  ``TEMP_PATH`` itself, where compiles only ever make fresh private
  directories with ``mkdtemp``;
- a symbolic link must be root's (in a sticky directory anyone may plant one,
  and ``fs.protected_symlinks`` may be off);
- a path that does not exist yet is judged by its nearest existing ancestor,
  which must also not be a sticky world-writable directory (anyone could
  create the missing name there first).

When every directory of a chain passes, nobody but root can change where the
path leads afterwards, so checking first and using later is sound.

The rule (:func:`writable_by`, :func:`judge`) is pure; the I/O (:func:`walk`,
:func:`check_root_ownership`) only lstat()s and readlink()s.
:func:`open_regular` opens (or creates) a file in the service's directories
without following a symbolic link or blocking on a FIFO; for reading only,
:func:`stapinit.core.safeio.read_regular` does the same.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from stapinit.core.errors import StapinitError
from stapinit.core.lsb import EXIT_NOT_CONFIGURED
from stapinit.core.values import is_release
from stapinit.initscript.options import (
    OptionError,
    PathUse,
    named_paths,
    parse_options,
    split_options,
)
from stapinit.initscript.settings import Settings

#: Symbolic links followed in one path before giving up, as the kernel does.
MAX_SYMLINKS = 40


class UntrustedPathError(StapinitError):
    """A path root would rely on can be changed by someone else; str() is one line."""

    exit_code = EXIT_NOT_CONFIGURED


class Role(enum.Enum):
    """What root does with a path (``stop`` relies on some only: :func:`shutdown_paths`)."""

    CONFIG = "configuration"
    SCRIPT = "script"
    CACHE = "cache"
    STATE = "state"
    TEMP = "temporary files"
    LOG = "log"
    TOOL = "tool"
    OPTION = "path named by a script's options"


class Trusted(NamedTuple):
    """One path root relies on: where it comes from, for the message."""

    path: str
    role: Role
    label: str  # "SCRIPT_PATH", "STAP", "alpha_OPT -I", ...
    sticky_leaf_ok: bool = False  # TEMP_PATH may itself be /tmp
    device_leaf_ok: bool = False  # LOG_FILE may be root's /dev/null or /dev/full


class Step(NamedTuple):
    """One path met while resolving: its ``lstat`` owner and mode, or missing."""

    path: str
    uid: int | None  # None: it does not exist (always the last step)
    mode: int = 0


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


def _open_to_others(mode: int) -> bool:
    return stat.S_ISDIR(mode) and bool(mode & (stat.S_IWOTH | stat.S_IWGRP))


def judge(
    steps: Sequence[Step], sticky_leaf_ok: bool = False, device_leaf_ok: bool = False
) -> tuple[str, str] | None:
    """The first step of a resolved path someone else can change: ``(path, why)``, or None.

    ``steps`` is what :func:`walk` gives: ``/``, each directory and symbolic
    link met in order, and the path itself (or its first missing component).
    Sticky root-owned directories pass on the way (the next step is judged
    on its own); at the end only when ``sticky_leaf_ok``. ``device_leaf_ok``
    accepts a root-owned character device at the end (``/dev/null``: what is
    written there goes nowhere, whoever else may write it too).
    """
    last_directory: Step | None = None
    for index, step in enumerate(steps):
        if step.uid is None:
            if last_directory is not None and _open_to_others(last_directory.mode):
                return step.path, (
                    f"does not exist, and others may create it in {last_directory.path}"
                )
            return None
        if stat.S_ISLNK(step.mode):
            if step.uid != 0:
                return step.path, f"is a symbolic link owned by uid {step.uid}"
            continue
        at_end = index == len(steps) - 1
        if at_end and device_leaf_ok and step.uid == 0 and stat.S_ISCHR(step.mode):
            return None
        who = writable_by(step.uid, step.mode, sticky_ok=sticky_leaf_ok or not at_end)
        if who is not None:
            return step.path, f"is writable by {who}"
        if stat.S_ISDIR(step.mode):
            last_directory = step
    return None


def walk(path: str, lstat_cache: dict[str, os.stat_result | None] | None = None) -> list[Step]:
    """Resolve absolute ``path`` as the kernel would, listing every step from ``/``.

    Stops at the first missing component (its step has ``uid=None``), and
    quietly at anything else that keeps the path from resolving (a file used
    as a directory, a loop, no permission): using the path then fails anyway,
    loudly. Raises :class:`UntrustedPathError` for a NUL byte in ``path``.
    """
    if "\0" in path:
        raise UntrustedPathError(f"refusing to run as root: {path!r} holds a NUL byte")
    cache = {} if lstat_cache is None else lstat_cache

    def lstat(text: str) -> os.stat_result | None:
        if text not in cache:
            try:
                cache[text] = os.lstat(text)
            except FileNotFoundError:
                cache[text] = None
        return cache[text]

    try:
        root = lstat("/")
    except OSError:
        return []
    assert root is not None
    steps = [Step("/", root.st_uid, root.st_mode)]
    todo = list(reversed(path.split("/")))
    current: list[str] = []
    links = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if current:
                current.pop()
            continue
        here = "/" + "/".join([*current, name])
        try:
            facts = lstat(here)
        except OSError:
            return steps
        if facts is None:
            steps.append(Step(here, None))
            return steps
        steps.append(Step(here, facts.st_uid, facts.st_mode))
        if stat.S_ISLNK(facts.st_mode):
            links += 1
            try:
                target = os.readlink(here)
            except OSError:
                return steps
            if links > MAX_SYMLINKS:
                return steps
            if target.startswith("/"):
                current = []
            todo.extend(reversed(target.split("/")))
            continue
        current.append(name)
    return steps


def _on_path(tool: str) -> str | None:
    """Where ``exec`` finds a bare program name on ``PATH`` (execvp(3)), or None."""
    if not tool or "/" in tool:
        return None
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", tool)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate if candidate.startswith("/") else os.path.abspath(candidate)
    return None


def _entries(directory: Path, suffixes: tuple[str, ...]) -> Iterator[str]:
    try:
        with os.scandir(directory) as entries:
            names = sorted(entry.name for entry in entries if entry.name.endswith(suffixes))
    except OSError:
        return
    for name in names:
        yield str(directory / name)


def _option_paths(settings: Settings) -> Iterator[Trusted]:
    for variable, assignment in sorted(settings.script_vars.items()):
        if not variable.endswith("_OPT"):
            continue
        try:
            options = parse_options(split_options(assignment.value))
        except OptionError:
            continue  # the script itself reports it, with FILE:LINE
        for flag, value, use in named_paths(options):
            if use is PathUse.EXEC:
                # -c CMD: the program the loader starts as root (a bare name: on PATH).
                program = value.split()[0] if value.split() else ""
                found = program if program.startswith("/") else _on_path(program)
                if found:
                    yield Trusted(found, Role.OPTION, f"{variable} {flag} {value}")
                continue
            if not value.startswith("/"):
                continue  # relative to the compile's private directory, or the loader's cwd
            if use is PathUse.WRITE:
                # -o FILE may carry strftime(3) formats in its name: its directory decides.
                yield Trusted(os.path.dirname(value), Role.OPTION, f"{variable} {flag} {value}")
            else:
                yield Trusted(value, Role.OPTION, f"{variable} {flag}")
                if flag in _READ_TREES:
                    yield from _tree(value, f"{variable} {flag} {value}")


#: Options naming a directory stap reads every file of (tapsets, runtime sources).
_READ_TREES = frozenset({"-I", "-R"})
#: Files judged under one such directory; a larger tree is refused, not half-judged.
MAX_TREE_ENTRIES = 10000


def _tree(directory: str, label: str) -> Iterator[Trusted]:
    """Every entry below ``directory`` (links not followed: each is judged where it leads)."""
    count = 0
    for parent, directories, files in os.walk(directory, followlinks=False):
        for name in sorted(directories) + sorted(files):
            count += 1
            if count > MAX_TREE_ENTRIES:
                raise UntrustedPathError(
                    f"refusing to run as root: {directory} ({label}) holds more than"
                    f" {MAX_TREE_ENTRIES} entries to check"
                )
            yield Trusted(os.path.join(parent, name), Role.OPTION, label)


def trusted_paths(settings: Settings, releases: Iterable[str]) -> list[Trusted]:
    """Every path root relies on, with its role and where it comes from.

    The configuration files read and ``CONFIG_PATH``; ``SCRIPT_PATH`` and its
    scripts; ``CACHE_PATH`` and the modules and records of ``releases``;
    ``STAT_PATH``, ``TEMP_PATH``, ``LOG_FILE``, ``MODULES_LIST``; the tools
    (a bare name as found on ``PATH``); and absolute paths that scripts'
    options name (``-I``, ``-R``, ``--sysroot``, ``-d``, the directory of ``-o``,
    the program of ``-c``).
    """
    paths = [Trusted(str(path), Role.CONFIG, "configuration file") for path in settings.files_read]
    paths.append(Trusted(str(settings.config_path), Role.CONFIG, "CONFIG_PATH"))
    paths.append(Trusted(str(settings.script_path), Role.SCRIPT, "SCRIPT_PATH"))
    paths += [Trusted(p, Role.SCRIPT, "script") for p in _entries(settings.script_path, (".stp",))]
    paths.append(Trusted(str(settings.cache_path), Role.CACHE, "CACHE_PATH"))
    for release in dict.fromkeys(releases):
        if not is_release(release):
            continue
        directory = settings.cache_path / release
        paths.append(Trusted(str(directory), Role.CACHE, "cache directory"))
        cached = _entries(directory, (".ko", ".bo", ".opts"))
        paths += [Trusted(path, Role.CACHE, "cache") for path in cached]
    paths.append(Trusted(str(settings.stat_path), Role.STATE, "STAT_PATH"))
    paths.append(Trusted(str(settings.modules_list), Role.STATE, "MODULES_LIST"))
    paths.append(Trusted(str(settings.temp_path), Role.TEMP, "TEMP_PATH", sticky_leaf_ok=True))
    paths.append(Trusted(str(settings.log_file), Role.LOG, "LOG_FILE", device_leaf_ok=True))
    for label, tool in (
        ("STAP", settings.stap),
        ("STAPRUN", settings.staprun),
        ("STAPBPF", settings.stapbpf),
    ):
        found = tool if tool.startswith("/") else _on_path(tool)
        if found is not None:
            paths.append(Trusted(found, Role.TOOL, label))
    paths += _option_paths(settings)
    return paths


def check_paths(paths: Iterable[Trusted]) -> None:
    """Raise :class:`UntrustedPathError` for the first path someone else can change or swap."""
    lstat_cache: dict[str, os.stat_result | None] = {}
    listed = list(paths)
    named = {trusted.path for trusted in listed if trusted.role is not Role.OPTION}
    for trusted in listed:
        steps = walk(trusted.path, lstat_cache)
        verdict = judge(steps, trusted.sticky_leaf_ok, trusted.device_leaf_ok)
        if verdict is None:
            continue
        where, why = verdict
        # An ancestor that is itself a setting or a file on the list speaks for itself.
        if where in named:
            context = ""
        elif where == trusted.path:
            context = f" (named by {trusted.label})"
        else:
            context = f" (on the way to {trusted.label} {trusted.path})"
        raise UntrustedPathError(f"refusing to run as root: {where} {why}{context}")


def shutdown_paths(settings: Settings) -> list[Trusted]:
    """What ``stop`` relies on: the configuration, the status records and ``STAPRUN``.

    Stopping runs nothing from the script or cache directories, so those
    (and ``STAP``, ``TEMP_PATH``) may be untrusted without stopping it.
    """
    return [
        trusted
        for trusted in trusted_paths(settings, ())
        if trusted.role in (Role.CONFIG, Role.STATE) or trusted.label == "STAPRUN"
    ]


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


def open_regular(path: Path | str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """Open a regular file without following a symbolic link or blocking on a FIFO.

    ``flags`` may add ``O_WRONLY``, ``O_APPEND``, ``O_CREAT`` (with ``mode``).
    Raises :class:`OSError` (``strerror`` says why, ``filename`` names it) for a
    symbolic link, anything that is not a regular file, a NUL byte in the path,
    and the usual failures.
    """
    text = os.fspath(path)
    if "\0" in text:
        raise OSError(errno.EINVAL, "the path holds a NUL byte", text)
    all_flags = flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(text, all_flags, mode)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link", text) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "is not a regular file", text)
    return fd
