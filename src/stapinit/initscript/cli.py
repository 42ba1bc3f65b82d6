"""``systemtap-service``: the command line (spec §2).

Every command is one row of :data:`COMMANDS`: what it needs (root, the lock)
and which options it takes. Imports stay minimal: this runs at boot, before
most of the system is up (``argparse`` costs about 1 ms more than ``getopt``
here; see the README's measurements).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import FrameType
from typing import Literal, NamedTuple, NoReturn

from stapinit import __version__
from stapinit.core import process, values
from stapinit.core.bashvars import ConfigError
from stapinit.core.errors import StapinitError, UsageError
from stapinit.core.lsb import EXIT_PRIVILEGE, EXIT_USAGE, STATUS_UNKNOWN
from stapinit.core.names import is_valid_name
from stapinit.core.process import Process
from stapinit.initscript.commands import CommandError, Initscript, Request
from stapinit.initscript.lock import CommandLock
from stapinit.initscript.log import Log, LogError
from stapinit.initscript.ownership import UntrustedPathError, check_root_ownership
from stapinit.initscript.settings import Settings, load_settings

Lock = Literal["always", "if-writable", "never"]
Action = Callable[[Initscript, Request], int]


def _compile(initscript: Initscript, request: Request) -> int:
    if request.all_kernels:
        from stapinit.initscript import kernels

        return kernels.compile_all_kernels(initscript, request)
    return initscript.compile(request)


def _pack(initscript: Initscript, request: Request) -> int:
    # Imported here: tarfile and hashlib have no place on the boot path.
    from stapinit.initscript import packing

    return packing.pack(initscript, request)


def _unpack(initscript: Initscript, request: Request) -> int:
    from stapinit.initscript import packing

    return packing.unpack(initscript, request)


def _watch(initscript: Initscript, request: Request) -> int:
    from stapinit.initscript import watch

    return watch.watch(initscript, request, lambda: _lock("start", initscript.settings, initscript))


class Command(NamedTuple):
    """One command: what it does, what it needs and which options it takes."""

    action: Action
    help: str
    root: bool  # must run as root
    # "always": state-changing; "if-writable": compile, cleanup, pack and unpack
    # change the cache a start reads, but a build host's user without access to
    # STAT_PATH may still work on a cache of their own.
    lock: Lock
    options: frozenset[str] = frozenset()  # beyond -c, -R, -y


COMMANDS: dict[str, Command] = {
    "start": Command(
        Initscript.start, "start scripts (compiling stale caches first)", True, "always"
    ),
    "stop": Command(Initscript.stop, "stop scripts, dependents first", True, "always"),
    "restart": Command(Initscript.restart, "stop, then start", True, "always"),
    "reload": Command(Initscript.restart, "same as restart", True, "always"),
    "force-reload": Command(Initscript.restart, "same as restart", True, "always"),
    "condrestart": Command(
        lambda i, r: i.restart(r, only_if_running=True),
        "restart only if a script is running",
        True,
        "always",
    ),
    "try-restart": Command(
        lambda i, r: i.restart(r, only_if_running=True), "same as condrestart", True, "always"
    ),
    "status": Command(
        Initscript.status,
        "show each script's state and requirements",
        False,
        "never",
        frozenset({"json"}),
    ),
    "compile": Command(
        _compile,
        "compile scripts into the cache for a kernel release",
        False,
        "if-writable",
        frozenset({"release", "all_kernels"}),
    ),
    "cleanup": Command(
        Initscript.cleanup,
        "remove scripts' caches for a kernel release",
        False,
        "if-writable",
        frozenset({"release"}),
    ),
    "pack": Command(
        _pack,
        "write caches of one or more releases, with their compile options, to an archive",
        False,
        "if-writable",
        frozenset({"release", "output"}),
    ),
    "unpack": Command(
        _unpack,
        "verify such an archive and install it into CACHE_PATH and CONFIG_PATH",
        False,
        "if-writable",
    ),
    # Locks for start and for each decision itself: it runs for as long as the scripts.
    "watch": Command(
        _watch, "start, then report the scripts to systemd until they stop", True, "never"
    ),
}
# Commands that must work whatever else is broken: they read the status
# records, and a bad value elsewhere in the configuration costs a warning.
_SHUTDOWN = frozenset({"stop", "status"})

USAGE = (
    "usage: systemtap-service {start|stop|restart|status|compile|cleanup|condrestart|"
    "try-restart|reload|force-reload} [-r kernelrelease] [-c config] [-R] [-y] [--json] "
    "[script ...]\n"
    "       systemtap-service compile --all-kernels [-c config] [-y] [script ...]\n"
    "       systemtap-service pack [-r kernelrelease ...] [-c config] -o FILE [script ...]\n"
    "       systemtap-service unpack [-c config] [-y] FILE\n"
    "       systemtap-service watch [-c config] [script ...]"
)


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line errors (exit 2) instead of its own usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> _Parser:
    commands = "\n".join(f"  {name:<14}{command.help}" for name, command in COMMANDS.items())
    parser = _Parser(
        prog="systemtap-service",
        usage=USAGE.removeprefix("usage: "),
        description="Run the SystemTap scripts of the script directory as services.",
        epilog=f"commands:\n{commands}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", metavar="COMMAND")
    parser.add_argument("scripts", nargs="*", metavar="SCRIPT")
    parser.add_argument(
        "-r",
        dest="releases",
        action="append",
        metavar="RELEASE",
        help="kernel release for compile, cleanup, pack (pack takes several)",
    )
    parser.add_argument(
        "--all-kernels",
        action="store_true",
        help="compile: every release with a build tree in /lib/modules, skipping valid caches",
    )
    parser.add_argument("-o", dest="output", metavar="FILE", help="pack: the archive to write")
    parser.add_argument("-c", dest="config", metavar="CONFIG", help="global configuration file")
    parser.add_argument("-R", dest="recursive", action="store_true", help="also requirements")
    parser.add_argument("-y", dest="assume_yes", action="store_true", help="answer yes")
    parser.add_argument("--json", action="store_true", help="status: print JSON")
    parser.add_argument("--version", action="version", version=f"systemtap-service {__version__}")
    return parser


def parse_command_line(argv: Sequence[str]) -> tuple[str, Path | None, Request]:
    """Split the arguments into command, config file and request (options anywhere).

    Raises :class:`UsageError` (exit 2) with one line.
    """
    args = _parser().parse_intermixed_args(list(argv))
    command: str = args.command
    if command not in COMMANDS:
        raise UsageError(f"unknown command: {command}")
    releases: list[str] = args.releases or []
    args.release = releases[-1] if releases else None
    if len(releases) > 1 and command != "pack":
        raise UsageError("-r may be given more than once only with pack")
    allowed = COMMANDS[command].options
    for option, flag in (
        ("release", "-r"),
        ("output", "-o"),
        ("all_kernels", "--all-kernels"),
        ("json", "--json"),
    ):
        if getattr(args, option) not in (None, False) and option not in allowed:
            raise UsageError(f"{flag} is not valid with {command}")
    if args.all_kernels and args.release is not None:
        raise UsageError("--all-kernels and -r exclude each other")
    if command == "pack" and args.output is None:
        raise UsageError("pack needs -o FILE")
    scripts: tuple[str, ...] = tuple(args.scripts)
    archive = Path(args.output) if args.output is not None else None
    if command == "unpack":
        if len(scripts) != 1:
            raise UsageError("unpack takes exactly one archive file")
        archive, scripts = Path(scripts[0]), ()
    # Names and releases become file names under CACHE_PATH and STAT_PATH.
    for name in scripts:
        if not is_valid_name(name):
            raise UsageError(f"{name!r} is not a valid script name")
    for release in releases:
        if not values.is_release(release):
            raise UsageError(f"{release!r} is not a kernel release")
    request = Request(
        scripts,
        args.release,
        args.recursive,
        args.assume_yes,
        args.json,
        archive,
        args.all_kernels,
        tuple(releases),
    )
    return command, Path(args.config) if args.config is not None else None, request


def ask(question: str) -> bool:
    """Ask on the terminal; without one, answer no and say so (never hang at boot)."""
    if not sys.stdin.isatty():
        print(f"{question} [y/N] no (not a terminal; use -y)", flush=True)
        return False
    # Nothing has changed yet while we ask, so Ctrl-C may end the command at once.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    finally:
        signal.signal(signal.SIGINT, previous)
    return answer.strip().lower() in ("y", "yes")


def _lock(
    command: str, settings: Settings, initscript: Initscript
) -> AbstractContextManager[object]:
    """The command's lock, as its row in :data:`COMMANDS` asks."""
    mode = COMMANDS[command].lock
    stat_path = settings.stat_path
    if mode == "never":
        return nullcontext()
    if mode == "if-writable":
        target = stat_path if stat_path.exists() else stat_path.parent
        if not os.access(target, os.W_OK):
            return nullcontext()
    try:
        stat_path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"cannot create STAT_PATH {stat_path}: {error.strerror}") from None
    if not os.access(stat_path, os.W_OK):
        raise CommandError(f"STAT_PATH {stat_path} is not writable", EXIT_PRIVILEGE)
    return CommandLock(
        stat_path,
        settings.lock_timeout,
        command,
        initscript.is_interrupted,
        (lambda pid: _preempt(pid, initscript)) if command == "stop" else None,
    )


def _preempt(pid: int, initscript: Initscript) -> None:
    """Shutdown must work: ask the command holding the lock (a start stuck on a loader) to end.

    SIGTERM makes a systemtap-service end its waits at once and release the
    lock, stopping what it had half-started; anything else is left alone.
    """
    argv = process.command_line(pid)
    if not any(os.path.basename(word) == "systemtap-service" for word in argv[:3]):
        return
    initscript.log.warning(f"asking the running '{' '.join(argv[1:3])}' (pid {pid}) to give up")
    holder = Process.of(pid)
    if holder is not None:
        holder.signal(signal.SIGTERM)


def _load(command: str, config: Path | None, request: Request, log: Log) -> Settings:
    """The settings, checked for root; for stop and status, bad values only warn."""
    lenient = command in _SHUTDOWN
    settings = load_settings(config, on_error=(lambda e: log.warning(str(e))) if lenient else None)
    try:
        check_root_ownership(settings, request.release)
    except UntrustedPathError as error:
        if not lenient:
            raise
        # Stopping runs nothing from the script or cache directories; it
        # still refuses if what it would run (STAPRUN) or the records it
        # trusts (STAT_PATH) are not root's alone.
        check_root_ownership(settings, request.release, shutdown_only=True)
        log.warning(f"{error}; going on, as {command} runs nothing from there")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``systemtap-service``: one ``except`` maps every error to its exit code."""
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        _parser().print_help()
        return 0
    log = Log(None)
    command = ""
    try:
        command, config, request = parse_command_line(args)
        settings = _load(command, config, request, log)
        if COMMANDS[command].root and os.geteuid() != 0:
            raise CommandError(f"{command} must be run as root", EXIT_PRIVILEGE)
        if command != "status":
            log = Log(settings.log_file)
            try:
                log.open()
            except LogError as error:
                log.warning(f"{error}; logging to the console only")
        log.info(f"systemtap-service {' '.join(args)}")
        initscript = Initscript(settings, log, ask)

        def interrupt(signum: int, frame: FrameType | None) -> None:
            initscript.interrupted = True

        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
        with _lock(command, settings, initscript):
            return COMMANDS[command].action(initscript, request)
    except UsageError as error:
        print(f"systemtap-service: {error}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    except StapinitError as error:
        log.error(str(error))
        if command == "status" and isinstance(error, (ConfigError, UntrustedPathError)):
            return STATUS_UNKNOWN  # LSB: status cannot tell
        return error.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except OSError as error:
        # An I/O failure nothing above expected (a file where a directory
        # should be): one line naming the file, not a traceback.
        where = f"{error.filename}: " if error.filename else ""
        log.error(f"{where}{error.strerror or error}")
        return 1
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
