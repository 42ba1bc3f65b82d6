"""``stap-server``: the compile server's command line.

``stap-server [-c CONFIG] [--allow-root]
{start|stop|restart|condrestart|try-restart|force-reload|status|run}``

``start`` puts the server in the background and records its pid; ``run`` serves
in the foreground (for systemd).  Started as root, the server reads its key (which
belongs to root) and binds its port, then becomes the service user (``USER``,
default ``stap-server``), which every compile runs as, so no compile can read the
key; ``--allow-root`` keeps root, but stap itself always runs as the service user.
Started as another user, the server runs as that user and warns that compiles can
read its key.
Errors are one line on stderr; exit codes are LSB's (see
:mod:`stapinit.server.errors`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from stapinit.core import lsb
from stapinit.core.errors import StapinitError
from stapinit.server import control
from stapinit.server.config import DEFAULT_CONFIG, ServerConfig, load_config

COMMANDS = (
    "start",
    "stop",
    "restart",
    "condrestart",
    "try-restart",
    "force-reload",
    "status",
    "run",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Usage errors on one line, LSB exit status 2."""
        usage = " ".join(self.format_usage().split()[1:])  # drop "usage:", join lines
        self.exit(2, f"stap-server: {message}; usage: {usage}\n")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="stap-server", description="SystemTap compile server over TLS.")
    parser.add_argument(
        "-c", "--config", type=Path, help=f"configuration file (default: {DEFAULT_CONFIG})"
    )
    parser.add_argument(
        "--allow-root",
        action="store_true",
        help="keep running as root instead of becoming the service user",
    )
    parser.add_argument("command", choices=COMMANDS, metavar="{" + "|".join(COMMANDS) + "}")
    return parser.parse_args(argv)


def _start(config: ServerConfig, allow_root: bool, foreground: bool) -> int:
    # Imported here so that status and stop need not load TLS and X.509 code.
    from stapinit.server.startup import start

    return start(config, allow_root, foreground)


def _dispatch(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    command: str = args.command
    if command == "status":
        code, message = control.status(config)
        print(message)
        return code
    if command == "stop":
        print(control.stop(config))
        return lsb.EXIT_OK
    if command in ("start", "run"):
        return _start(config, args.allow_root, foreground=command == "run")
    if command != "restart" and control.status(config)[0] != lsb.EXIT_OK:
        # condrestart, try-restart, force-reload: only a running server is restarted.
        print("stap-server is not running; nothing to restart")
        return lsb.EXIT_OK
    print(control.stop(config))
    return _start(config, args.allow_root, foreground=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stap-server``; returns the exit status."""
    args = _parse_args(argv)
    try:
        return _dispatch(args)
    except StapinitError as exc:
        print(f"stap-server: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Last resort: the one-line promise holds even for what we did not foresee.
        print(f"stap-server: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return lsb.EXIT_FAILED
