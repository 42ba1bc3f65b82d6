"""Global parameters of systemtap-service (spec §4.1) and where they come from.

The global file is read first, then every ``CONFIG_PATH/*.conf`` in name
order, as upstream's initscript sources them into one shell: later files see
and may override what earlier ones set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from stapinit.core import values
from stapinit.core.bashvars import Assignment, ConfigError, parse_assignments
from stapinit.core.safeio import read_regular

if TYPE_CHECKING:
    from stapinit.trust.address import ServerAddress

DEFAULT_CONFIG_FILE = Path("/etc/systemtap/config")

# Parameter name -> default, for every global parameter we read (spec §4.1,
# plus the tool paths and timeouts packagers and tests need to set).
DEFAULTS: Mapping[str, str] = {
    "SCRIPT_PATH": "/etc/systemtap/script.d",
    "CONFIG_PATH": "/etc/systemtap/conf.d",
    "CACHE_PATH": "/var/cache/systemtap",
    "TEMP_PATH": "/tmp",
    "STAT_PATH": "/var/run/systemtap",
    "LOG_FILE": "/var/log/systemtap.log",
    "PASSALL": "yes",
    "RECURSIVE": "no",
    "AUTOCOMPILE": "yes",
    "DEFAULT_START": "",
    "ALLOW_CACHEONLY": "no",
    "STAP": "stap",
    "STAPRUN": "staprun",
    "STAPBPF": "stapbpf",
    "MODULES_LIST": "/proc/modules",
    "LOCK_TIMEOUT": "30",
    "STOP_TIMEOUT": "10",
    # A boot on a loaded machine may take long to attach probes; a script that
    # is not ready by then is a failed start (and stopped again).
    "START_TIMEOUT": "60",
    # staprun -L/-D, staprun -d: loading and unloading a module.
    "LOAD_TIMEOUT": "120",
    # stap -p4: a compile that hangs must not hold the boot (or the lock) forever.
    "COMPILE_TIMEOUT": "900",
    # How many scripts start (or stop) at once; empty means one per CPU.
    "START_JOBS": "",
    "COMPILE_SERVER": "",
    "REQUIRE_SIGNED": "no",
}
T = TypeVar("T")
_PATH_KEYS = ("SCRIPT_PATH", "CONFIG_PATH", "CACHE_PATH", "TEMP_PATH", "STAT_PATH", "LOG_FILE")


class Settings(NamedTuple):
    """Everything the configuration files decide, already validated."""

    script_path: Path
    config_path: Path
    cache_path: Path
    temp_path: Path
    stat_path: Path
    log_file: Path
    passall: bool
    recursive: bool
    autocompile: bool
    default_start: tuple[str, ...]
    allow_cacheonly: bool
    stap: str
    staprun: str
    stapbpf: str
    modules_list: Path
    lock_timeout: float
    stop_timeout: float
    start_timeout: float
    load_timeout: float
    compile_timeout: float
    start_jobs: int
    # Per-script parameters, by variable name (``NAME_OPT``, ``NAME_REQ``), with
    # where they were set so that errors can point there.
    script_vars: Mapping[str, Assignment] = MappingProxyType({})
    files_read: tuple[Path, ...] = ()
    # Compile through these stap-servers instead of a local stap (issue 14).
    compile_servers: tuple[ServerAddress, ...] = ()
    # Load only caches whose signature verifies against the trusted signers.
    require_signed: bool = False

    def script_var(self, script: str, suffix: str) -> Assignment | None:
        """The ``<script>_<suffix>`` assignment, if any file made one."""
        return self.script_vars.get(f"{script}_{suffix}")


def settings_from_assignments(
    assignments: Sequence[Assignment],
    files_read: Sequence[Path] = (),
    on_error: Callable[[ConfigError], None] | None = None,
) -> Settings:
    """Build validated settings from every assignment, later ones winning.

    Pure: no files are read, so the rules are tested directly. A bad value
    raises :class:`ConfigError`, unless ``on_error`` is given (``stop`` and
    ``status`` must work whatever else is broken): it gets the error and the
    default is used instead.
    """
    last: dict[str, Assignment] = {}
    for assignment in assignments:
        last[assignment.name] = assignment

    def raw(key: str) -> str:
        found = last.get(key)
        return found.value if found else DEFAULTS[key]

    def where(key: str) -> tuple[str, int]:
        found = last.get(key)
        return (found.filename, found.line) if found else ("<defaults>", 0)

    def convert(key: str, converter: Callable[[str], T]) -> T:
        try:
            return converter(raw(key))
        except ValueError as error:
            problem = ConfigError(*where(key), f"{key}={error}")
            if on_error is None:
                raise problem from None
            on_error(problem)
            return converter(DEFAULTS[key] or "1")

    def boolean(key: str) -> bool:
        return convert(key, values.boolean)

    def path(key: str) -> Path:
        return Path(convert(key, values.absolute_path))

    def seconds(key: str) -> float:
        return convert(key, values.seconds)

    def tool(key: str) -> str:
        return convert(key, values.tool)

    def servers(key: str) -> tuple[ServerAddress, ...]:
        words = raw(key).split()
        if not words:
            return ()
        # Imported only when used: most hosts compile locally.
        from stapinit.protocol import DEFAULT_PORT
        from stapinit.trust.address import AddressError, parse_address

        try:
            return tuple(parse_address(word, DEFAULT_PORT) for word in words)
        except AddressError as error:
            raise ConfigError(*where(key), f"{key}: {error}") from None

    paths = {key: path(key) for key in _PATH_KEYS}
    script_vars = {
        name: assignment
        for name, assignment in last.items()
        if name.endswith(("_OPT", "_REQ")) and name not in DEFAULTS
    }
    return Settings(
        script_path=paths["SCRIPT_PATH"],
        config_path=paths["CONFIG_PATH"],
        cache_path=paths["CACHE_PATH"],
        temp_path=paths["TEMP_PATH"],
        stat_path=paths["STAT_PATH"],
        log_file=paths["LOG_FILE"],
        passall=boolean("PASSALL"),
        recursive=boolean("RECURSIVE"),
        autocompile=boolean("AUTOCOMPILE"),
        default_start=tuple(raw("DEFAULT_START").split()),
        allow_cacheonly=boolean("ALLOW_CACHEONLY"),
        stap=tool("STAP"),
        staprun=tool("STAPRUN"),
        stapbpf=tool("STAPBPF"),
        modules_list=path("MODULES_LIST"),
        lock_timeout=seconds("LOCK_TIMEOUT"),
        stop_timeout=seconds("STOP_TIMEOUT"),
        start_timeout=seconds("START_TIMEOUT"),
        load_timeout=seconds("LOAD_TIMEOUT"),
        compile_timeout=seconds("COMPILE_TIMEOUT"),
        start_jobs=(
            convert("START_JOBS", lambda text: values.count(text, 1, 1024))
            if raw("START_JOBS")
            else os.cpu_count() or 1
        ),
        script_vars=script_vars,
        files_read=tuple(files_read),
        compile_servers=servers("COMPILE_SERVER"),
        require_signed=boolean("REQUIRE_SIGNED"),
    )


#: A configuration file is a page of assignments; anything larger is a mistake.
MAX_CONFIG_BYTES = 1 << 20


def _read_file(path: Path) -> str:
    """The text of a config file: regular, bounded, never blocking on a FIFO.

    A link is followed: as root, the ownership check judged where it leads.
    """
    try:
        data = read_regular(path, MAX_CONFIG_BYTES, follow_links=True)
    except OSError as error:
        raise ConfigError(str(path), 0, f"cannot read: {error.strerror}") from None
    return data.decode("utf-8", errors="surrogateescape")


def _is_dev_null(path: Path) -> bool:
    """True for the null device (whatever its name), which reads as an empty file."""
    try:
        return path.stat().st_rdev == os.stat(os.devnull).st_rdev and path.is_char_device()
    except (OSError, ValueError):
        return False


def _parse(
    text: str,
    filename: str,
    env: Mapping[str, str],
    on_error: Callable[[ConfigError], None] | None,
) -> list[Assignment]:
    """The file's assignments; with ``on_error``, those before a syntax error.

    ``stop`` and ``status`` must work whatever else is broken: like bash,
    which stops sourcing a file at its first error, they keep what came
    before it (``STAT_PATH`` is usually set early) and go on with a warning.
    """
    lines = text.splitlines(keepends=True)
    while True:
        try:
            return parse_assignments("".join(lines), filename, env)
        except ConfigError as error:
            if on_error is None:
                raise
            on_error(error)
            if error.line <= 0 or not lines:
                return []
            # Shorter every time, so this ends.
            lines = lines[: min(error.line, len(lines)) - 1]


def load_settings(
    config_file: Path | None,
    environment: Mapping[str, str] | None = None,
    on_error: Callable[[ConfigError], None] | None = None,
) -> Settings:
    """Read the global file (``-c`` or the default) and then ``CONFIG_PATH/*.conf``.

    A missing default global file means all defaults; a missing file named
    with ``-c`` is an error. Raises :class:`ConfigError`; ``on_error`` (see
    :func:`settings_from_assignments`) only softens bad values, not bad syntax.
    """
    # Upstream's initscript set its defaults before sourcing the files, so a
    # file may use them: X_OPT="-I $SCRIPT_PATH/inc".
    env = {**(os.environ if environment is None else environment), **DEFAULTS}
    global_file = config_file or DEFAULT_CONFIG_FILE
    assignments: list[Assignment] = []
    files_read: list[Path] = []
    if config_file is not None or global_file.exists():
        if _is_dev_null(global_file):
            pass  # `-c /dev/null`: no global settings, as sourcing it would give
        elif not global_file.is_file():
            why = "not a regular file" if global_file.exists() else "no such configuration file"
            raise ConfigError(str(global_file), 0, why)
        else:
            assignments += _parse(_read_file(global_file), str(global_file), env, on_error)
            files_read.append(global_file)
    known = {a.name: a.value for a in assignments}
    config_dir = Path(known.get("CONFIG_PATH", DEFAULTS["CONFIG_PATH"]))
    try:
        conf_files = sorted(p for p in config_dir.glob("*.conf") if p.is_file())
    except OSError:
        conf_files = []
    for conf in conf_files:
        more = _parse(_read_file(conf), str(conf), {**env, **known}, on_error)
        assignments += more
        known.update((a.name, a.value) for a in more)
        files_read.append(conf)
    settings = settings_from_assignments(assignments, files_read, on_error)
    if settings.require_signed or settings.compile_servers:
        _need_cryptography(assignments)
    return settings


def _need_cryptography(assignments: Sequence[Assignment]) -> None:
    """COMPILE_SERVER and REQUIRE_SIGNED need the ``cryptography`` package: say so, once.

    Without it they would fail with a traceback, at boot; raises ConfigError.
    """
    import importlib.util

    if importlib.util.find_spec("cryptography") is not None:
        return
    last = [a for a in assignments if a.name in ("COMPILE_SERVER", "REQUIRE_SIGNED")][-1]
    raise ConfigError(
        last.filename, last.line, f"{last.name} needs the python3-cryptography package"
    )
