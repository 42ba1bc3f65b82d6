"""Assembling and running the server: identity, compiler, sandbox, cache, HTTPS.

Everything is checked before the server serves, and ``stap-server start`` waits
for that (:mod:`stapinit.server.background`), so a bad key, a missing stap, a
sandbox that cannot work or a busy port is reported by ``start`` itself.

Started as root, the server prepares its directories, reads its identity (which
belongs to root: see :func:`stapinit.server.directories.prepare_paths`) and binds
its port -- below 1024 too -- and only then becomes the service user, which every
compile runs as.  Each compile runs in a sandbox that shows it nothing of the
server's state (:mod:`stapinit.server.sandbox`); even without it (``SANDBOX=no``)
the key is not readable by the service user.  Started by another user
(development), everything runs as that user, key included, and a warning says so.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from stapinit import __version__
from stapinit.core import lsb
from stapinit.protocol import ServerInfo
from stapinit.server import control
from stapinit.server.account import drop_privileges, lookup_user
from stapinit.server.app import CompileApp, CompileSlots
from stapinit.server.background import Readiness, detach
from stapinit.server.cache import CompileCache
from stapinit.server.compiler import Compiler, Limits, RunAs
from stapinit.server.config import ServerConfig
from stapinit.server.directories import prepare_paths
from stapinit.server.errors import StapServerError, path_error
from stapinit.server.httpd import ConnectionLimits, StapHTTPServer, listen, make_ssl_context
from stapinit.server.identity import Identity, expires_soon, load_or_create
from stapinit.server.logfile import LOG, setup_logging
from stapinit.server.pidfile import remove_pid_file, write_pid_file
from stapinit.server.sandbox import find_sandbox
from stapinit.server.serving import serve
from stapinit.trust.certs import not_valid_after

MODULES_DIR = Path("/lib/modules")
#: Said at every start with SANDBOX=no.
NO_SANDBOX_WARNING = (
    "warning: SANDBOX=no: compiles are not sandboxed and can read every file USER may "
    "read (the server's log and cache among them)"
)


def installed_releases(modules_dir: Path = MODULES_DIR) -> tuple[str, ...]:
    """Kernel releases with a configured build tree, which stap needs."""
    try:
        entries = list(modules_dir.iterdir())
    except OSError:
        return ()
    return tuple(sorted(e.name for e in entries if (e / "build" / ".config").is_file()))


def _releases(config: ServerConfig) -> tuple[str, ...]:
    if not config.releases:
        found = installed_releases()
        if not found:
            raise StapServerError(
                f"no kernel build tree under {MODULES_DIR}/*/build: nothing to compile for "
                "(install linux-headers, or set RELEASES)",
                lsb.EXIT_NOT_CONFIGURED,
            )
        return found
    for release in config.releases:
        if not (MODULES_DIR / release / "build").exists():
            raise StapServerError(
                f"RELEASES names {release}, but {MODULES_DIR / release / 'build'} does not exist",
                lsb.EXIT_NOT_CONFIGURED,
            )
    return config.releases


@dataclass
class _Server:
    httpd: StapHTTPServer
    compiler: Compiler
    info: ServerInfo
    identity: Identity


@dataclass
class _Endpoint:
    """What is set up while still root: the identity, TLS and the listening socket."""

    identity: Identity
    ssl_context: ssl.SSLContext
    sock: socket.socket


def _unprivileged_warning(config: ServerConfig) -> str:
    return (
        f"warning: not started as root, so compiles run as the server's own user and can "
        f"read its private key {config.cert_dir / 'stap.key'}; start the server as root "
        "in production (it then runs compiles as USER)"
    )


def _endpoint(config: ServerConfig) -> _Endpoint:
    """Read (or make) the identity and bind the port: done as root when started as root."""
    try:
        identity = load_or_create(config.cert_dir, config.cert_days)
        ssl_context = make_ssl_context(identity)
    except OSError as exc:
        raise StapServerError(
            f"cannot use the server identity in {config.cert_dir}: {exc.strerror or exc}",
            lsb.EXIT_PRIVILEGE,
        ) from None
    try:
        sock = listen(config.listen_address, config.port)
    except OSError as exc:
        code = lsb.EXIT_PRIVILEGE if isinstance(exc, PermissionError) else lsb.EXIT_FAILED
        raise StapServerError(
            f"cannot listen on {control.listen_where(config)}: {exc.strerror or exc}", code
        ) from None
    return _Endpoint(identity, ssl_context, sock)


def check_sandbox_paths(config: ServerConfig) -> None:
    """Refuse ``SANDBOX_PATHS`` that would show compiles the server's state or log.

    Judged by real locations (symlinks resolved): a path that is, contains or lies
    inside ``STATE_DIR`` or the directory of ``LOG_FILE``.
    """
    private = {
        "STATE_DIR": Path(os.path.realpath(config.state_dir)),
        "LOG_FILE": Path(os.path.realpath(config.log_file.parent)),
    }
    for path in config.sandbox_paths:
        real = Path(os.path.realpath(path))
        for setting, place in private.items():
            if real == place or real in place.parents or place in real.parents:
                raise StapServerError(
                    f"SANDBOX_PATHS names {path}, which would show compiles {setting} ({place})",
                    lsb.EXIT_NOT_CONFIGURED,
                )


def _build(
    config: ServerConfig, releases: tuple[str, ...], endpoint: _Endpoint, run_as: RunAs | None
) -> _Server:
    """Everything else the server needs, checked before it serves."""
    tmp_root = config.state_dir / "tmp"
    sandbox = None
    if config.sandbox:
        check_sandbox_paths(config)
        sandbox = find_sandbox(
            releases, [config.stap], [str(path) for path in config.sandbox_paths]
        )
        if sandbox is None:
            raise StapServerError(
                "cannot find bwrap, which sandboxes every compile; install bubblewrap "
                "(or set SANDBOX=no to compile without a sandbox)",
                lsb.EXIT_NOT_INSTALLED,
            )
    try:
        compiler = Compiler(
            config.stap,
            tmp_root,
            Limits(config.compile_timeout, config.compile_memory),
            run_as,
            sandbox,
        )
    except OSError as exc:
        raise path_error("prepare", tmp_root, exc) from None
    stap_version = compiler.version()
    short = re.search(r"version ([^\s,)]+)", stap_version)
    info = ServerInfo(
        version=__version__,
        stap_version=short[1] if short else stap_version,
        arch=platform.machine(),
        releases=releases,
        fingerprint=endpoint.identity.fingerprint,
    )
    cache_dir = config.state_dir / "cache"
    try:
        cache = CompileCache(cache_dir, config.cache_size) if config.cache_size > 0 else None
    except OSError as exc:
        raise path_error("prepare", cache_dir, exc) from None
    app = CompileApp(
        info,
        endpoint.identity,
        compiler,
        cache,
        CompileSlots(config.workers, config.queue_size),
        stap_version,
        config.queue_timeout,
    )
    limits = ConnectionLimits(
        handshake_timeout=min(config.handshake_timeout, config.io_timeout),
        io_timeout=config.io_timeout,
        max_connections=config.max_connections,
        per_client=config.max_connections_per_client,
        max_request_size=config.max_request_size,
    )
    httpd = StapHTTPServer(endpoint.sock, app, endpoint.ssl_context, limits)
    return _Server(httpd, compiler, info, endpoint.identity)


def _set_up_as_root(
    config: ServerConfig, allow_root: bool, foreground: bool
) -> tuple[_Endpoint, RunAs | None]:
    """Directories, identity, port and (in the foreground) pid file; then drop root.

    Returns the endpoint and whom stap is to run as when the server keeps root.
    """
    user = lookup_user(config.user)
    if user.uid == 0:
        # Scripts must never be compiled as root, --allow-root or not.
        raise StapServerError(
            f"USER={config.user} is root; set USER to an unprivileged account such as stap-server",
            lsb.EXIT_NOT_CONFIGURED,
        )
    prepare_paths(config, user, keep_root=allow_root)
    endpoint = _endpoint(config)
    if foreground:
        # Written as root: under systemd its directory (RuntimeDirectory=) is root's.
        write_pid_file(config.pid_file, os.getpid())
    if allow_root:
        return endpoint, RunAs(user.uid, user.gid)
    drop_privileges(user)
    return endpoint, None


def start(config: ServerConfig, allow_root: bool, foreground: bool) -> int:
    """Start the server (in the background unless ``foreground``); the exit status."""
    code, message = control.status(config)
    if code == lsb.EXIT_OK:
        print(message)
        return lsb.EXIT_OK
    if code == lsb.STATUS_DEAD_WITH_PIDFILE:
        control.stop(config)  # clears the stale pid file
    releases = _releases(config)
    if foreground:
        return _run(config, allow_root, releases, Readiness(None), foreground=True)
    return detach(
        lambda readiness: _run(config, allow_root, releases, readiness, foreground=False),
        config.pid_file,
        lambda pid: f"stap-server (pid {pid}) started on {control.listen_url(config)}",
    )


def _run(
    config: ServerConfig,
    allow_root: bool,
    releases: tuple[str, ...],
    readiness: Readiness,
    foreground: bool,
) -> int:
    """Set up, report readiness, serve until SIGTERM; the exit status."""
    warnings = []
    pid_written = False
    if os.geteuid() == 0:
        endpoint, run_as = _set_up_as_root(config, allow_root, foreground)
        pid_written = foreground
    else:
        warnings.append(_unprivileged_warning(config))
        endpoint, run_as = _endpoint(config), None
    if not config.sandbox:
        warnings.append(NO_SANDBOX_WARNING)
    try:
        server = _build(config, releases, endpoint, run_as)
        setup_logging(config.log_file)
        if foreground and not pid_written:
            write_pid_file(config.pid_file, os.getpid())
            pid_written = True
    except BaseException:
        endpoint.sock.close()
        if pid_written:
            remove_pid_file(config.pid_file, os.getpid())
        raise
    for warning in warnings:
        print(f"stap-server: {warning}", file=sys.stderr)
    readiness.ready()
    _log_start(config, server, warnings)

    def shutdown() -> None:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.compiler.kill_all()
        LOG.info("stopped")

    clean = serve(server.httpd.serve_forever, shutdown)
    remove_pid_file(config.pid_file, os.getpid())
    return lsb.EXIT_OK if clean else lsb.EXIT_FAILED


def _log_start(config: ServerConfig, server: _Server, warnings: list[str]) -> None:
    LOG.info(
        "started: stap-server %s, %s, listening on %s, releases %s, certificate %s, "
        "%d compile workers, running as uid %d, compiles %s",
        __version__,
        server.info.stap_version,
        control.listen_where(config),
        " ".join(server.info.releases),
        server.info.fingerprint,
        config.workers,
        os.getuid(),
        "sandboxed" if server.compiler.sandbox is not None else "NOT sandboxed",
    )
    for warning in warnings:
        LOG.warning(warning)
    if server.compiler.stale_removed:
        LOG.info(
            "removed %d compile directories left in %s by an earlier run",
            server.compiler.stale_removed,
            server.compiler.tmp_root,
        )
    if expires_soon(server.identity):
        LOG.warning(
            "certificate %s expires on %s; renew it (see the config file)",
            server.identity.cert_path,
            f"{not_valid_after(server.identity.cert):%Y-%m-%d}",
        )
