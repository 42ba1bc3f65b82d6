"""``systemtap-service``: the command line (spec §2).

Imports stay minimal: this runs at boot, before most of the system is up.
"""

from __future__ import annotations

import getopt
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from stapinit import __version__
from stapinit.service.bashvars import ConfigError
from stapinit.service.commands import (
    EXIT_NOT_CONFIGURED,
    EXIT_PRIVILEGE,
    EXIT_USAGE,
    CommandError,
    Request,
    Service,
)
from stapinit.service.lock import LockError
from stapinit.service.log import Log, LogError
from stapinit.service.settings import load_settings

COMMANDS = (
    "start",
    "stop",
    "restart",
    "status",
    "compile",
    "cleanup",
    "condrestart",
    "try-restart",
    "reload",
    "force-reload",
)
_NEEDS_ROOT = frozenset(COMMANDS) - {"status", "compile", "cleanup"}
USAGE = (
    "usage: systemtap-service {start|stop|restart|status|compile|cleanup|condrestart|"
    "try-restart|reload|force-reload} [-r kernelrelease] [-c config] [-R] [-y] [--json] "
    "[script ...]"
)
HELP = f"""{USAGE}

Run the SystemTap scripts of the script directory as services.

commands:
  start         start scripts (compiling stale caches first when AUTOCOMPILE=yes)
  stop          stop scripts, dependents first
  restart       stop, then start
  condrestart, try-restart
                restart only if a script is running
  reload, force-reload
                same as restart
  status        show each script's state and requirements
  compile       compile scripts into the cache for a kernel release
  cleanup       remove scripts' caches for a kernel release

options:
  -r RELEASE    kernel release for compile and cleanup (default: the running one)
  -c CONFIG     global configuration file (default: /etc/systemtap/config)
  -R            also act on the scripts' requirements (NAME_REQ)
  -y            answer yes to every question
  --json        status: print machine-readable JSON
  -h, --help    show this help
  --version     show the version
"""


class UsageError(Exception):
    """The command line is wrong."""


def parse_command_line(argv: Sequence[str]) -> tuple[str, Path | None, Request]:
    """Split the arguments into command, config file and request (options anywhere)."""
    try:
        options, words = getopt.gnu_getopt(list(argv), "r:c:Ryh", ["help", "version", "json"])
    except getopt.GetoptError as error:
        raise UsageError(str(error)) from None
    config: Path | None = None
    release: str | None = None
    recursive = assume_yes = as_json = False
    for flag, value in options:
        if flag == "-r":
            release = value
        elif flag == "-c":
            config = Path(value)
        elif flag == "-R":
            recursive = True
        elif flag == "-y":
            assume_yes = True
        elif flag == "--json":
            as_json = True
    if not words:
        raise UsageError("no command given")
    command, scripts = words[0], tuple(words[1:])
    if command not in COMMANDS:
        raise UsageError(f"unknown command: {command}")
    if release is not None and command not in ("compile", "cleanup"):
        raise UsageError(f"-r is valid only with compile and cleanup, not {command}")
    return command, config, Request(scripts, release, recursive, assume_yes, as_json)


def ask(question: str) -> bool:
    """Ask on the terminal; without one, answer no and say so (never hang at boot)."""
    if not sys.stdin.isatty():
        print(f"{question} [y/N] no (not a terminal; use -y)", flush=True)
        return False
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def run(command: str, service: Service, request: Request) -> int:
    """Dispatch one command."""
    if command == "start":
        return service.start(request)
    if command == "stop":
        return service.stop(request)
    if command in ("restart", "reload", "force-reload"):
        return service.restart(request)
    if command in ("condrestart", "try-restart"):
        return service.restart(request, only_if_running=True)
    if command == "status":
        return service.status(request)
    if command == "compile":
        return service.compile(request)
    return service.cleanup(request)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``systemtap-service``."""
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        print(HELP, end="")
        return 0
    if "--version" in args:
        print(f"systemtap-service {__version__}")
        return 0
    try:
        command, config, request = parse_command_line(args)
    except UsageError as error:
        print(f"systemtap-service: {error}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = load_settings(config)
    except ConfigError as error:
        print(f"systemtap-service: {error}", file=sys.stderr)
        return EXIT_NOT_CONFIGURED
    if command in _NEEDS_ROOT and os.geteuid() != 0:
        print(f"systemtap-service: {command} must be run as root", file=sys.stderr)
        return EXIT_PRIVILEGE
    log = Log(None if command == "status" else settings.log_file)
    try:
        log.open()
        log.info(f"systemtap-service {' '.join(args)}")
        return run(command, Service(settings, log, ask), request)
    except (CommandError, LogError, LockError) as error:
        code = error.code if isinstance(error, CommandError) else 1
        log.error(str(error))
        return code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
