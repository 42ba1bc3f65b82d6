"""Command line of ``stap-loader``: run the loader in the foreground (as root)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from stapinit.core import values
from stapinit.core.errors import StapinitError
from stapinit.core.lsb import EXIT_FAILED, EXIT_PRIVILEGE
from stapinit.loader.config import LoaderConfig, read_config
from stapinit.loader.listener import bind_listener, systemd_listener
from stapinit.loader.sessions import LOG, Sessions
from stapinit.trust.stores import StorePaths

PROG = "stap-loader"


def _seconds(text: str) -> float:
    try:
        return values.seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Load SystemTap modules for stapdev/stapusr members (runs as root).",
    )
    parser.add_argument("--config", type=Path, help="configuration file")
    parser.add_argument("--socket", type=Path, help="Unix socket to listen on")
    parser.add_argument("--stapbpf", help="stapbpf to run .bo modules with")
    parser.add_argument("--staprun", help="staprun to run .ko modules with")
    parser.add_argument("--signer-store", type=Path, help="directory of trusted signers")
    parser.add_argument("--stop-timeout", type=_seconds, help="seconds between SIGTERM and SIGKILL")
    return parser


def _apply_overrides(config: LoaderConfig, args: argparse.Namespace) -> LoaderConfig:
    overrides = {
        "socket_path": args.socket,
        "stapbpf": args.stapbpf,
        "staprun": args.staprun,
        "signer_store": args.signer_store,
        "stop_timeout": args.stop_timeout,
    }
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def setup_logging() -> None:
    """One line per event on stderr, which systemd sends to the journal."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


def _serve(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise StapinitError("must run as root (loading modules needs it)", EXIT_PRIVILEGE)
    config = _apply_overrides(read_config(args.config, StorePaths.default()), args)
    listener = systemd_listener(os.environ)
    bound = listener is None
    if listener is None:
        listener = bind_listener(config.socket_path)
    sessions = Sessions(config)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        sessions.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    LOG.info("listening on %s", config.socket_path if bound else "the socket from systemd")
    try:
        sessions.serve(listener)
    finally:
        sessions.close()
        listener.close()
        if bound:
            config.socket_path.unlink(missing_ok=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stap-loader``; returns the exit status."""
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        return _serve(args)
    except StapinitError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # the one-line promise holds even for the unforeseen
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
