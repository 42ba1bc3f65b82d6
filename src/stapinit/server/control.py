"""``status`` and ``stop`` of a running server, from its pid file."""

from __future__ import annotations

from typing import Final

from stapinit.core.lsb import EXIT_OK, EXIT_PRIVILEGE, STATUS_DEAD_WITH_PIDFILE, STATUS_NOT_RUNNING
from stapinit.core.process import Ending, Process
from stapinit.server.config import ServerConfig
from stapinit.server.errors import StapServerError
from stapinit.server.pidfile import is_server, read_pid, remove_pid_file

#: Seconds a stopping server gets to finish before SIGKILL.
STOP_TIMEOUT: Final = 15.0


def listen_where(config: ServerConfig) -> str:
    """``HOST:PORT`` (IPv6 in brackets)."""
    host = config.listen_address
    return f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"


def listen_url(config: ServerConfig) -> str:
    """``https://HOST:PORT``."""
    return f"https://{listen_where(config)}"


def status(config: ServerConfig) -> tuple[int, str]:
    """LSB status code and a one-line description."""
    pid = read_pid(config.pid_file)
    if pid is None:
        return STATUS_NOT_RUNNING, "stap-server is stopped"
    if pid and is_server(pid):
        return EXIT_OK, f"stap-server (pid {pid}) is running on {listen_url(config)}"
    return (
        STATUS_DEAD_WITH_PIDFILE,
        f"stap-server is dead but its pid file {config.pid_file} exists",
    )


def stop(config: ServerConfig) -> str:
    """Stop the running server (SIGTERM, then SIGKILL after a while); idempotent."""
    pid = read_pid(config.pid_file)
    if pid is None:
        return "stap-server is not running"
    process = Process.of(pid) if pid and is_server(pid) else None
    if process is None:
        try:
            config.pid_file.unlink(missing_ok=True)
        except PermissionError:
            raise StapServerError(
                f"cannot remove stale pid file {config.pid_file}", EXIT_PRIVILEGE
            ) from None
        return "stap-server was not running (removed a stale pid file)"
    try:
        ending = process.terminate(STOP_TIMEOUT)
    except PermissionError:
        raise StapServerError(
            f"not allowed to stop stap-server (pid {pid}); try as root", EXIT_PRIVILEGE
        ) from None
    if ending is Ending.STUCK:
        raise StapServerError(f"stap-server (pid {pid}) did not stop, even on SIGKILL")
    remove_pid_file(config.pid_file, pid)
    return f"stap-server (pid {pid}) stopped"
