"""Command line of ``stap-loader``: run the loader service in the foreground."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from stapinit.loader.config import ConfigError, LoaderConfig, read_config
from stapinit.loader.service import (
    Service,
    ServiceError,
    bind_listener,
    log_stderr,
    systemd_listener,
)
from stapinit.trust.stores import StorePaths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stap-loader",
        description="Load SystemTap modules for stapdev/stapusr members (runs as root).",
    )
    parser.add_argument("--config", type=Path, help="configuration file")
    parser.add_argument("--socket", type=Path, help="Unix socket to listen on")
    parser.add_argument("--stapbpf", help="stapbpf to run .bo modules with")
    parser.add_argument("--staprun", help="staprun to run .ko modules with")
    parser.add_argument("--signer-store", type=Path, help="directory of trusted signers")
    parser.add_argument("--stop-timeout", type=float, help="seconds between SIGTERM and SIGKILL")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stap-loader``; returns the exit status."""
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("stap-loader: must run as root (loading modules needs it)", file=sys.stderr)
        return 1
    try:
        config = _apply_overrides(read_config(args.config, StorePaths.default()), args)
        listener = systemd_listener(dict(os.environ))
        bound = listener is None
        if listener is None:
            listener = bind_listener(config.socket_path)
    except (ConfigError, ServiceError) as exc:
        print(f"stap-loader: {exc}", file=sys.stderr)
        return 1

    service = Service(config)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log_stderr(f"listening on {config.socket_path if bound else 'the socket from systemd'}")
    try:
        service.serve(listener)
    except Exception as exc:  # the one-line promise holds even for the unforeseen
        log_stderr(f"internal error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        service.children.stop_all(config.stop_timeout)
        listener.close()
        if bound:
            config.socket_path.unlink(missing_ok=True)
    return 0
