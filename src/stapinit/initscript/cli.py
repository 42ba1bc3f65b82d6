"""``systemtap-service``: the command line (spec §2).

Imports stay minimal: this runs at boot, before most of the system is up.
"""

from __future__ import annotations

import getopt
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from stapinit import __version__
from stapinit.core.bashvars import ConfigError
from stapinit.core.lsb import EXIT_NOT_CONFIGURED, EXIT_PRIVILEGE, EXIT_USAGE
from stapinit.core.names import is_valid_name
from stapinit.initscript.commands import CommandError, Request, Service
from stapinit.initscript.lock import LockError
from stapinit.initscript.log import Log, LogError
from stapinit.initscript.ownership import UntrustedPathError, check_root_ownership
from stapinit.initscript.settings import load_settings

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
    "pack",
    "unpack",
    "watch",
)
# pack and unpack only read and write the cache and conf directories: their
# permissions decide, as for compile and cleanup.
_NEEDS_ROOT = frozenset(COMMANDS) - {"status", "compile", "cleanup", "pack", "unpack"}
_TAKE_RELEASE = ("compile", "cleanup", "pack")
USAGE = (
    "usage: systemtap-service {start|stop|restart|status|compile|cleanup|condrestart|"
    "try-restart|reload|force-reload} [-r kernelrelease] [-c config] [-R] [-y] [--json] "
    "[script ...]\n"
    "       systemtap-service compile --all-kernels [-c config] [-y] [script ...]\n"
    "       systemtap-service pack [-r kernelrelease] [-c config] -o FILE [script ...]\n"
    "       systemtap-service unpack [-c config] [-y] FILE\n"
    "       systemtap-service watch [-c config] [script ...]"
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
  pack          write the caches of a release and the scripts' conf.d files to an
                archive, for hosts without a compiler
  unpack        verify such an archive and install it into CACHE_PATH and CONFIG_PATH
  watch         start, then stay and report the scripts to systemd (sd_notify);
                exit 1 when one dies (systemtap.service runs this)

options:
  -r RELEASE    kernel release for compile, cleanup and pack (default: the running one)
  --all-kernels compile: every release with a build tree in /lib/modules, skipping
                valid caches
  -o FILE       pack: the archive to write
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
        options, words = getopt.gnu_getopt(
            list(argv), "r:c:Ryho:", ["help", "version", "json", "all-kernels"]
        )
    except getopt.GetoptError as error:
        raise UsageError(str(error)) from None
    config: Path | None = None
    release: str | None = None
    archive: Path | None = None
    recursive = assume_yes = as_json = all_kernels = False
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
        elif flag == "-o":
            archive = Path(value)
        elif flag == "--all-kernels":
            all_kernels = True
    if not words:
        raise UsageError("no command given")
    command, scripts = words[0], tuple(words[1:])
    if command not in COMMANDS:
        raise UsageError(f"unknown command: {command}")
    if release is not None and command not in _TAKE_RELEASE:
        raise UsageError(f"-r is valid only with compile, cleanup and pack, not {command}")
    if all_kernels and (command != "compile" or release is not None):
        raise UsageError("--all-kernels is valid only with compile, and not with -r")
    if (archive is not None) != (command == "pack"):
        raise UsageError("pack needs -o FILE, and -o is valid only with pack")
    if command == "unpack":
        if len(scripts) != 1:
            raise UsageError("unpack takes exactly one archive file")
        archive, scripts = Path(scripts[0]), ()
    # Names and releases become file names under CACHE_PATH and STAT_PATH.
    for name in scripts:
        if not is_valid_name(name):
            raise UsageError(f"{name!r} is not a valid script name")
    if release is not None and (not release or "/" in release or release in (".", "..")):
        raise UsageError(f"{release!r} is not a kernel release")
    request = Request(scripts, release, recursive, assume_yes, as_json, archive, all_kernels)
    return command, config, request


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
    if command == "compile" and request.all_kernels:
        from stapinit.initscript import kernels

        return kernels.compile_all_kernels(service, request)
    if command == "compile":
        return service.compile(request)
    if command == "watch":
        from stapinit.initscript import watch

        return watch.watch(service, request)
    if command in ("pack", "unpack"):
        # Imported here: tarfile and hashlib have no place on the boot path.
        from stapinit.initscript import packing

        return (
            packing.pack(service, request)
            if command == "pack"
            else packing.unpack(service, request)
        )
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
        check_root_ownership(settings, request.release)
    except (ConfigError, UntrustedPathError) as error:
        print(f"systemtap-service: {error}", file=sys.stderr)
        return EXIT_NOT_CONFIGURED
    if command in _NEEDS_ROOT and os.geteuid() != 0:
        print(f"systemtap-service: {command} must be run as root", file=sys.stderr)
        return EXIT_PRIVILEGE
    log = Log(None if command == "status" else settings.log_file)
    try:
        log.open()
        log.info(f"systemtap-service {' '.join(args)}")
        service = Service(settings, log, ask)

        def interrupt(signum: int, frame: FrameType | None) -> None:
            service.interrupted = True

        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
        return run(command, service, request)
    except (CommandError, LogError, LockError) as error:
        code = error.code if isinstance(error, CommandError) else 1
        log.error(str(error))
        return code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except OSError as error:
        # An I/O failure nothing above expected (a full disk, a file where a
        # directory should be): one line naming the file, not a traceback.
        where = f"{error.filename}: " if error.filename else ""
        log.error(f"{where}{error.strerror or error}")
        return 1
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
