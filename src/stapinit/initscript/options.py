"""Per-script stap options (``NAME_OPT``, spec §4.2.1): one table says what each is for.

Every option of stap 4.8 and 5.x (``cmdline.cxx``: ``STAP_SHORT_OPTIONS`` and
``stap_long_options``; what each does: ``session.cxx`` ``parse_cmdline`` and
``buildrun.cxx`` ``make_run_command``) has one row in :data:`TABLE`, with its
:class:`Phase`:

- ``COMPILE``: changes what ``stap -p4`` builds; given to the compile and
  recorded in the cache's ``.opts``, so changing it recompiles.
- ``REPORT``: given to the compile, not recorded: it changes only what stap
  prints, how long it may take or where it caches (``-v``, ``-w``,
  ``--rlimit-*``); changing it never invalidates a cache.
- ``RUN``: taken by the loader at start (``-o``, ``-S``, ``-s``, ``-c``,
  ``-x``); never given to the compile nor recorded, so changing it never
  invalidates a cache.
- ``SERVICE``: the service decides it itself (``-p``, ``-m``, ``-r``, ``-e``,
  ``-F``, ``-k``, ``--tmpdir``, ``-h``, ``-V``): dropped.
- ``RUNTIME``: selects the runtime; the service passes ``--runtime=bpf``
  itself and records the runtime on its own line.
- ``REFUSED``: cannot work under the service (lists probes instead of
  compiling, runs elsewhere, is interactive, or is a run-time option the
  loaders do not take); refused with the reason.

Long options are matched as ``getopt_long`` does: an exact name, or an
unambiguous prefix (``--run=bpf`` is ``--runtime=bpf`` to stap, so it is here
too). Options are put back in one canonical spelling (``-D X=1``,
``--runtime=bpf``), so that equivalent spellings record the same cache.

Pure functions: the same option string always gives the same lists.
"""

from __future__ import annotations

import enum
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple

from stapinit.core.runtime import LoadOptions, RuntimeKind


class Phase(enum.Enum):
    """Where an option goes (see the module docstring)."""

    COMPILE = "compile"
    REPORT = "compile, not recorded"
    RUN = "run"
    SERVICE = "set by the service"
    RUNTIME = "runtime selection"
    REFUSED = "refused"


class Argument(enum.Enum):
    """Whether an option takes a value (getopt's ``has_arg``)."""

    NONE = "none"
    REQUIRED = "required"
    OPTIONAL = "optional"  # long options only: ``--name=VALUE`` or ``--name``


class PathUse(enum.Enum):
    """What root does with a path an option names (for the ownership check)."""

    READ = "read"  # stap reads it while compiling (tapsets, runtime, sysroot, objects)
    WRITE = "write"  # the loader writes it as root (-o FILE)
    EXEC = "run"  # the loader runs it as root (-c CMD: its first word)


class Row(NamedTuple):
    """One stap option: how it is spelled, what it takes, where it goes, and why."""

    flag: str  # one letter for a short option, "--name" for a long one
    argument: Argument
    phase: Phase
    why: str
    path: PathUse | None = None  # the value is a path root relies on
    since: str = "4.8"  # first stap release (of those audited) that has it


_A, _R, _O = Argument.NONE, Argument.REQUIRED, Argument.OPTIONAL
_C, _P, _U, _S, _T, _X = (
    Phase.COMPILE,
    Phase.REPORT,
    Phase.RUN,
    Phase.SERVICE,
    Phase.RUNTIME,
    Phase.REFUSED,
)

#: Every option of stap 4.8 and 5.x, short ones first in ``STAP_SHORT_OPTIONS`` order.
TABLE: Final[tuple[Row, ...]] = (
    Row("h", _A, _S, "shows help instead of compiling (spec: ignored)"),
    Row("V", _A, _S, "shows the version instead of compiling (spec: ignored)"),
    Row("v", _A, _P, "more verbose compile output"),
    Row("t", _A, _C, "the module collects probe timing"),
    Row("p", _R, _S, "the service runs pass 4 itself"),
    Row("I", _R, _C, "tapset directory read while compiling", PathUse.READ),
    Row("e", _R, _S, "the script is the .stp file"),
    Row("E", _R, _C, "script text compiled in with the file"),
    Row("o", _R, _U, "output file of the loader", PathUse.WRITE),
    Row("R", _R, _C, "runtime sources read while compiling", PathUse.READ),
    Row("r", _R, _S, "the service compiles for the running kernel or compile -r"),
    Row("a", _R, _C, "target architecture"),
    Row("m", _R, _S, "the module is named after the script"),
    Row("k", _A, _S, "the compile's directory is private and removed (spec: ignored)"),
    Row("g", _A, _C, "guru mode"),
    Row("P", _A, _C, "prologue searching"),
    Row("c", _R, _U, "command the loader runs", PathUse.EXEC),
    Row("x", _R, _U, "target process of the loader"),
    Row("D", _R, _C, "C macro in the module"),
    Row("b", _A, _C, "bulk (per-CPU) transport in the module"),
    Row("s", _R, _U, "buffer size, given to staprun as -b"),
    Row("u", _A, _C, "unoptimized translation"),
    Row("q", _A, _P, "tapset coverage report"),
    Row("i", _A, _X, "interactive mode"),
    Row("w", _A, _P, "suppresses compile warnings"),
    Row("l", _R, _X, "lists probes instead of compiling"),
    Row("d", _R, _C, "unwind/symbol data of an object", PathUse.READ),
    Row("L", _R, _X, "lists probes instead of compiling"),
    Row("F", _A, _S, "the service always runs flight-recorder mode (spec §4.2.1)"),
    Row("S", _R, _U, "output file switching (staprun -S size[,N])"),
    Row("B", _R, _C, "kbuild make option"),
    Row("J", _R, _X, "stap does not handle it (in its getopt string only)"),
    Row("j", _A, _X, "stap does not handle it (in its getopt string only)"),
    Row("W", _A, _C, "warnings become errors"),
    Row("G", _R, _X, "module parameters at load; the loaders here take none (nor did upstream's)"),
    Row("T", _R, _C, "the module exits after TIME seconds"),
    Row("--skip-badvars", _A, _C, "bad $variables read as zero"),
    Row("--vp", _R, _P, "per-pass compile verbosity"),
    Row("--unprivileged", _A, _C, "privilege level the module is checked for"),
    Row("--build-as", _O, _P, "user the compile runs as", since="5.0"),
    Row("--client-options", _A, _X, "internal to compile servers"),
    Row("--help", _A, _S, "shows help instead of compiling (spec: ignored)"),
    Row("--disable-cache", _A, _P, "stap's own cache"),
    Row("--poison-cache", _A, _P, "stap's own cache"),
    Row("--clean-cache", _A, _X, "cleans stap's cache instead of compiling"),
    Row("--compatible", _R, _C, "language version"),
    Row("--ldd", _A, _C, "unwind data of referenced libraries"),
    Row("--use-server", _O, _P, "compile on a compile server"),
    Row("--list-servers", _O, _X, "lists compile servers instead of compiling"),
    Row("--trust-servers", _O, _X, "changes compile-server trust instead of compiling"),
    Row("--use-server-on-error", _O, _P, "compile on a server after a failure"),
    Row("--use-http-server", _R, _P, "compile on an HTTP compile server"),
    Row("--all-modules", _A, _C, "unwind data of all loaded kernel modules"),
    Row("--sign-module", _O, _C, "module signing"),
    Row("--remote", _R, _X, "runs the script on another host"),
    Row("--remote-prefix", _A, _X, "only with --remote"),
    Row("--check-version", _A, _P, "version warnings"),
    Row("--version", _A, _S, "shows the version instead of compiling (spec: ignored)"),
    Row("--tmpdir", _R, _S, "the service compiles in a private directory of TEMP_PATH"),
    Row("--download-debuginfo", _O, _P, "fetches debuginfo while compiling"),
    Row("--dump-probe-types", _A, _X, "lists probe types instead of compiling"),
    Row("--dump-probe-aliases", _A, _X, "lists probe aliases instead of compiling"),
    Row("--dump-functions", _A, _X, "lists functions instead of compiling"),
    Row("--privilege", _R, _C, "privilege level the module is checked for"),
    Row("--suppress-handler-errors", _A, _C, "handler errors skipped in the module"),
    Row("--modinfo", _R, _C, "MODULE_INFO in the module"),
    Row("--rlimit-as", _R, _P, "limits the compile"),
    Row("--rlimit-cpu", _R, _P, "limits the compile"),
    Row("--rlimit-nproc", _R, _P, "limits the compile"),
    Row("--rlimit-stack", _R, _P, "limits the compile"),
    Row("--rlimit-fsize", _R, _P, "limits the compile"),
    Row("--sysroot", _R, _C, "target files read while compiling", PathUse.READ),
    Row("--sysenv", _R, _C, "environment of the sysroot"),
    Row("--suppress-time-limits", _A, _C, "time limits off in the module"),
    Row("--runtime", _R, _T, "kernel or bpf"),
    Row("--dyninst", _A, _X, "the dyninst runtime is not supported by the service"),
    Row("--bpf", _A, _T, "same as --runtime=bpf"),
    Row("--benchmark-sdt", _A, _X, "runs a benchmark instead of compiling"),
    Row("--benchmark-sdt-loops", _R, _X, "runs a benchmark instead of compiling"),
    Row("--benchmark-sdt-threads", _R, _X, "runs a benchmark instead of compiling"),
    Row("--color", _O, _P, "colours in compile messages"),
    Row("--colour", _O, _P, "colours in compile messages"),
    Row("--prologue-searching", _O, _C, "prologue searching"),
    Row("--save-uprobes", _A, _P, "saves uprobes.ko in the (private) compile directory"),
    Row("--target-namespaces", _R, _X, "staprun -N at load; the loaders here do not take it"),
    Row("--monitor", _O, _X, "interactive monitor mode"),
    Row("--interactive", _A, _X, "interactive mode"),
    Row("--example", _A, _X, "runs an example instead of the script"),
    Row("--no-global-var-display", _A, _C, "the module does not print globals at exit"),
    Row("--language-server", _A, _X, "runs a language server instead", since="5.0"),
)

_BY_FLAG: Final[Mapping[str, Row]] = {row.flag: row for row in TABLE}
_LONG_NAMES: Final[tuple[str, ...]] = tuple(row.flag for row in TABLE if row.flag.startswith("--"))
# Long options that are one option of stap's under two names.
_SAME_OPTION: Final[Mapping[str, str]] = {"--colour": "--color"}
_RUNTIMES: Final[Mapping[str, RuntimeKind]] = {"kernel": "kmod", "bpf": "bpf"}
_SWITCH_SIZE = re.compile(r"[0-9]{1,9}(,[0-9]{1,9})?")  # stap's own -S rule


class OptionError(ValueError):
    """An option string that cannot be split or used; str() is one line."""


class Option(NamedTuple):
    """One option as stap's getopt sees it: ``-o FILE`` is flag ``o``, value ``FILE``."""

    flag: str  # one letter for short options, "--name" for long ones
    value: str | None
    words: tuple[str, ...]  # its canonical spelling, to pass it on

    @property
    def row(self) -> Row:
        """Its row of :data:`TABLE`."""
        return _BY_FLAG[self.flag]


def split_options(text: str) -> list[str]:
    """Split ``text`` into words as the shell would (quotes keep words together)."""
    try:
        return shlex.split(text, comments=False, posix=True)
    except ValueError as error:
        raise OptionError(str(error).lower()) from None


def row_of(name: str) -> Row:
    """The row of ``-X`` or ``--name``: exact, else an unambiguous prefix (``getopt_long``).

    Raises :class:`OptionError` for an unknown or ambiguous name.
    """
    if len(name) == 2 and name[0] == "-" and name[1] != "-":
        if name[1] in _BY_FLAG:
            return _BY_FLAG[name[1]]
        raise OptionError(f"unknown stap option {name}")
    if name in _BY_FLAG:
        return _BY_FLAG[name]
    if not name.startswith("--") or len(name) < 3:
        raise OptionError(f"unknown stap option {name}")
    matches = {_SAME_OPTION.get(long, long) for long in _LONG_NAMES if long.startswith(name)}
    if len(matches) == 1:
        return _BY_FLAG[matches.pop()]
    if matches:
        listing = ", ".join(sorted(matches))
        raise OptionError(f"option {name} is ambiguous ({listing})")
    raise OptionError(f"unknown stap option {name}")


def _checked(option: Option) -> Option:
    row = option.row
    if row.phase is Phase.REFUSED:
        raise OptionError(f"{option.words[0]} cannot be used here: {row.why}")
    value = option.value
    if value is not None and ("\0" in value or "\n" in value):
        raise OptionError(f"{option.words[0]}: the value holds a NUL or newline character")
    if row.phase is Phase.RUNTIME and option.flag == "--runtime" and value not in _RUNTIMES:
        raise OptionError(f"--runtime={value}: the service runs kernel or bpf scripts")
    return option


def parse_options(words: Sequence[str]) -> list[Option]:
    """Group words into options, as stap's ``getopt_long`` would, checked against the table.

    Raises :class:`OptionError` for unknown or refused options, a missing or
    unexpected value, a malformed run-time value, and any word that is not an
    option (script arguments have no place in ``NAME_OPT``).
    """
    options: list[Option] = []
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word == "--" or not word.startswith("-") or word == "-":
            raise OptionError(f"unexpected argument {word!r} (only options are allowed)")
        if word.startswith("--"):
            name, equals, value = word.partition("=")
            row = row_of(name)
            if row.argument is Argument.NONE and equals:
                raise OptionError(f"option {row.flag} takes no value")
            if row.argument is Argument.REQUIRED and not equals:
                if index >= len(words):
                    raise OptionError(f"option {row.flag} needs an argument")
                value, equals = words[index], "="
                index += 1
            given = value if equals else None
            spelled = f"{row.flag}={given}" if given is not None else row.flag
            options.append(_checked(Option(row.flag, given, (spelled,))))
            continue
        # A cluster such as `-vk` or `-p4` or `-o FILE`.
        position = 1
        while position < len(word):
            letter = word[position]
            position += 1
            short = row_of(f"-{letter}")
            if short.argument is Argument.NONE:
                options.append(_checked(Option(letter, None, (f"-{letter}",))))
                continue
            if position < len(word):
                value = word[position:]
            elif index < len(words):
                value = words[index]
                index += 1
            else:
                raise OptionError(f"option -{letter} needs an argument")
            options.append(_checked(Option(letter, value, (f"-{letter}", value))))
            break
    return options


def _flatten(options: Sequence[Option]) -> list[str]:
    return [word for option in options for word in option.words]


def runtime_of(options: Sequence[Option]) -> RuntimeKind:
    """``"bpf"`` when the options select the BPF runtime, else ``"kmod"`` (last one wins)."""
    runtime: RuntimeKind = "kmod"
    for option in options:
        if option.flag == "--runtime":
            runtime = _RUNTIMES.get(option.value or "", "kmod")
        elif option.flag == "--bpf":
            runtime = "bpf"
    return runtime


def compile_options(options: Sequence[Option]) -> list[str]:
    """The options passed to ``stap -p4``: phases ``COMPILE`` and ``REPORT``.

    The runtime selection is not among them: the caller adds
    ``--runtime=bpf`` itself, once, so that it is recorded the same way.
    """
    return _flatten([o for o in options if o.row.phase in (Phase.COMPILE, Phase.REPORT)])


def recorded_options(options: Sequence[Option]) -> list[str]:
    """The options a cache's ``.opts`` records: phase ``COMPILE`` only.

    Changing any other option (run-time, report-only, set by the service)
    never makes a cache stale.
    """
    return _flatten([o for o in options if o.row.phase is Phase.COMPILE])


def named_paths(options: Sequence[Option]) -> list[tuple[str, str, PathUse]]:
    """The paths the options name that root reads or writes: ``(option, path, use)``.

    ``option`` is spelled ``-I`` or ``--sysroot``; paths are returned as
    written, relative ones are the caller's to judge.
    """
    found: list[tuple[str, str, PathUse]] = []
    for option in options:
        use = option.row.path
        if use is not None and option.value:
            flag = option.flag if option.flag.startswith("--") else f"-{option.flag}"
            found.append((flag, option.value, use))
    return found


def start_options(options: Sequence[Option]) -> LoadOptions:
    """Keep what staprun/stapbpf take at start: -o, -S, -s, -c, -x (last one wins).

    Their values are checked here, when the script starts, so that a bad one
    fails that script alone: :class:`OptionError` names the option.
    """
    found: dict[str, str] = {}
    for option in options:
        if option.row.phase is Phase.RUN and option.value is not None:
            found[option.flag] = option.value
    if "s" in found and not _is_buffer_size(found["s"]):
        raise OptionError(f"-s {found['s']}: buffer size must be a number of MB from 1 to 4095")
    if "S" in found and _SWITCH_SIZE.fullmatch(found["S"]) is None:
        raise OptionError(f"-S {found['S']}: expected size[,N] (MB, number of files)")
    if "x" in found and not found["x"].isdigit():
        raise OptionError(f"-x {found['x']}: expected a process id")
    if "c" in found and not found["c"].strip():
        raise OptionError("-c: the command is empty")
    return LoadOptions(
        output_file=found.get("o"),
        file_switch=found.get("S"),
        buffer_mb=found.get("s"),
        command=found.get("c"),
        target_pid=found.get("x"),
    )


def _is_buffer_size(value: str) -> bool:
    return value.isdigit() and len(value) <= 4 and 1 <= int(value) <= 4095
