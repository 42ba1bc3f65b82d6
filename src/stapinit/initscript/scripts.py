"""The script model: names, options, requirements and runtime (spec §3.3, §4.2)."""

from __future__ import annotations

import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from stapinit.core.errors import StapinitError
from stapinit.core.lsb import EXIT_NOT_CONFIGURED
from stapinit.core.names import is_valid_name, name_problem
from stapinit.core.runtime import MODULE_SUFFIX, LoadOptions, RuntimeKind
from stapinit.initscript.options import (
    Option,
    OptionError,
    compile_options,
    parse_options,
    recorded_options,
    runtime_of,
    split_options,
    start_options,
)
from stapinit.initscript.settings import Settings


class ScriptError(StapinitError):
    """A script or its configuration cannot be used; str() is one line (exit 6)."""

    exit_code = EXIT_NOT_CONFIGURED


class Script(NamedTuple):
    """One service: a ``.stp`` file (or only a cached module) and its settings."""

    name: str
    source: Path | None  # None for a cache-only script (ALLOW_CACHEONLY)
    options: tuple[Option, ...]
    requires: tuple[str, ...]
    runtime: RuntimeKind

    @property
    def module_suffix(self) -> str:
        """``.ko`` or ``.bo``, by runtime."""
        return MODULE_SUFFIX[self.runtime]

    @property
    def compile_options(self) -> list[str]:
        """Options for ``stap -p4`` (phases compile and report of the option table)."""
        return compile_options(self.options)

    @property
    def recorded_options(self) -> list[str]:
        """Options the cache record holds: only those that change the module."""
        return recorded_options(self.options)

    def start_options(self) -> LoadOptions:
        """Options the loader takes, after the §4.2.1 filter."""
        try:
            return start_options(self.options)
        except OptionError as error:
            raise ScriptError(f"{self.name}_OPT: {error}") from None


def make_script(
    name: str, source: Path | None, settings: Settings, cached_runtime: RuntimeKind | None = None
) -> Script:
    """Build a script from its file and its ``NAME_OPT`` / ``NAME_REQ`` settings."""
    opt = settings.script_var(name, "OPT")
    req = settings.script_var(name, "REQ")
    try:
        options = tuple(parse_options(split_options(opt.value))) if opt else ()
    except OptionError as error:
        assert opt is not None
        raise ScriptError(f"{opt.filename}:{opt.line}: {name}_OPT: {error}") from None
    requires = tuple(req.value.split()) if req else ()
    for requirement in requires:
        if not is_valid_name(requirement):
            assert req is not None
            raise ScriptError(
                f"{req.filename}:{req.line}: {name}_REQ: {requirement!r} is not a script name"
            )
    chose_runtime = any(option.flag in ("--runtime", "--bpf") for option in options)
    runtime = cached_runtime if cached_runtime and not chose_runtime else runtime_of(options)
    return Script(name, source, options, requires, runtime)


def cache_dir(settings: Settings, release: str) -> Path:
    """Where the compiled scripts for ``release`` live (spec §3.4)."""
    return settings.cache_path / release


def find_scripts(
    settings: Settings, release: str, warn: Callable[[str], None], lenient: bool = False
) -> dict[str, Script]:
    """Every script of the script directory, plus cache-only ones if allowed.

    Files whose names cannot be script names, dangling symbolic links and
    ``.stp`` entries that are not regular files are skipped with a warning
    saying why. ``lenient`` (for stop and status) turns a script whose
    ``NAME_OPT`` or ``NAME_REQ`` cannot be used into a warning and a script
    without them.
    """

    def make(name: str, source: Path | None, cached: RuntimeKind | None = None) -> Script:
        try:
            return make_script(name, source, settings, cached)
        except ScriptError as error:
            if not lenient:
                raise
            warn(str(error))
            return Script(name, source, (), (), cached or "kmod")

    found: dict[str, Script] = {}
    try:
        entries = sorted(settings.script_path.iterdir())
    except FileNotFoundError:
        # A production host fed only caches (spec §5.8) may have no scripts;
        # anywhere else a missing SCRIPT_PATH is a typo, not "no scripts".
        if not settings.allow_cacheonly:
            raise ScriptError(f"SCRIPT_PATH {settings.script_path} does not exist") from None
        entries = []
    except OSError as error:
        raise ScriptError(f"{settings.script_path}: {error.strerror}") from None
    for entry in entries:
        if entry.suffix != ".stp":
            continue
        if not entry.is_file():
            if entry.is_symlink() and not entry.exists():
                warn(f"{entry} is a dangling symbolic link; skipped")
            else:
                warn(f"{entry} is not a regular file; skipped")
            continue
        problem = name_problem(entry.stem)
        if problem is not None:
            warn(f"{entry.name} is not a valid script name: {problem}")
            continue
        found[entry.stem] = make(entry.stem, entry)
    if settings.allow_cacheonly:
        for runtime, suffix in MODULE_SUFFIX.items():
            for module in sorted(cache_dir(settings, release).glob(f"*{suffix}")):
                name = module.name[: -len(suffix)]
                if name not in found and is_valid_name(name) and _cache_entry(module):
                    found[name] = make(name, None, runtime)
    return found


def _cache_entry(module: Path) -> bool:
    """True for a well-formed cache entry: a regular module file and its regular record.

    A directory or a stray file named like a module is no script.
    """
    record = module.with_suffix(".opts")
    try:
        return stat.S_ISREG(module.lstat().st_mode) and stat.S_ISREG(record.lstat().st_mode)
    except OSError:
        return False


def requirements_map(scripts: Mapping[str, Script]) -> dict[str, Sequence[str]]:
    """``name -> requires`` for the dependency functions."""
    return {name: script.requires for name, script in scripts.items()}
