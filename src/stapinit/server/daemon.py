"""Assembling and running the server: identity, compiler, cache, HTTPS, pid file.

Everything is checked before the server goes to the background, so a bad key, a
missing stap or a busy port is reported by ``stap-server start`` itself.

Started as root, the server prepares its directories, reads its identity (which
belongs to root: see :func:`stapinit.server.service.prepare_paths`) and binds its
port -- below 1024 too -- and only then becomes the service user, which every
compile runs as.  A compile can make gcc open any file that user may read; the key
is not one of them.  Started by another user (development), everything runs as
that user, key included, and a warning says so.
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
from stapinit.server import service
from stapinit.server.app import CompileService, CompileSlots
from stapinit.server.cache import CompileCache
from stapinit.server.compiler import Compiler, CompilerSetupError, Limits, RunAs
from stapinit.server.config import ServerConfig
from stapinit.server.httpd import LOG, StapHTTPServer, listen, make_ssl_context
from stapinit.server.identity import Identity, IdentityError, expires_soon, load_or_create
from stapinit.server.service import ServiceError, path_error
from stapinit.trust.certs import not_valid_after

MODULES_DIR = Path("/lib/modules")


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
            raise ServiceError(
                f"no kernel build tree under {MODULES_DIR}/*/build: nothing to compile for "
                "(install linux-headers, or set RELEASES)",
                lsb.EXIT_NOT_CONFIGURED,
            )
        return found
    for release in config.releases:
        if not (MODULES_DIR / release / "build").exists():
            raise ServiceError(
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
    except IdentityError as exc:
        raise ServiceError(str(exc), lsb.EXIT_NOT_CONFIGURED) from None
    except OSError as exc:
        raise ServiceError(
            f"cannot use the server identity in {config.cert_dir}: {exc.strerror or exc}",
            lsb.EXIT_PRIVILEGE,
        ) from None
    try:
        sock = listen(config.listen_address, config.port)
    except OSError as exc:
        code = lsb.EXIT_PRIVILEGE if isinstance(exc, PermissionError) else lsb.EXIT_FAILED
        raise ServiceError(
            f"cannot listen on {_where(config)}: {exc.strerror or exc}", code
        ) from None
    return _Endpoint(identity, ssl_context, sock)


def _build(
    config: ServerConfig, releases: tuple[str, ...], endpoint: _Endpoint, run_as: RunAs | None
) -> _Server:
    """Everything else the server needs, checked before going to the background."""
    tmp_root = config.state_dir / "tmp"
    try:
        compiler = Compiler(
            config.stap,
            tmp_root,
            Limits(config.compile_timeout, config.compile_memory),
            run_as,
        )
        stap_version = compiler.version()
    except CompilerSetupError as exc:
        raise ServiceError(str(exc), lsb.EXIT_NOT_INSTALLED) from None
    except OSError as exc:
        raise path_error("prepare", tmp_root, exc) from None
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
    app = CompileService(
        info,
        endpoint.identity,
        compiler,
        cache,
        CompileSlots(config.workers, config.queue_size),
        stap_version,
        config.queue_timeout,
    )
    httpd = StapHTTPServer(
        endpoint.sock,
        app,
        endpoint.ssl_context,
        config.io_timeout,
        config.max_connections,
        config.max_request_size,
    )
    return _Server(httpd, compiler, info, endpoint.identity)


def _set_up_as_root(
    config: ServerConfig, allow_root: bool, foreground: bool
) -> tuple[_Endpoint, RunAs | None, bool]:
    """Directories, identity, port and (in the foreground) pid file; then drop root.

    Returns the endpoint, whom stap is to run as when the server keeps root, and
    whether the pid file was written.
    """
    user = service.lookup_user(config.user)
    if user.uid == 0:
        # Scripts must never be compiled as root, --allow-root or not.
        raise ServiceError(
            f"USER={config.user} is root; set USER to an unprivileged account such as stap-server",
            lsb.EXIT_NOT_CONFIGURED,
        )
    service.prepare_paths(config, user, keep_root=allow_root)
    endpoint = _endpoint(config)
    if foreground:
        # Written as root: under systemd its directory (RuntimeDirectory=) is root's.
        service.write_pid_file(config.pid_file, os.getpid())
    if allow_root:
        return endpoint, RunAs(user.uid, user.gid), foreground
    service.drop_privileges(user)
    return endpoint, None, foreground


def start(config: ServerConfig, allow_root: bool, foreground: bool) -> int:
    """Start the server (in the background unless ``foreground``); the exit status."""
    code, message = service.status(config)
    if code == lsb.EXIT_OK:
        print(message)
        return lsb.EXIT_OK
    if code == lsb.STATUS_DEAD_WITH_PIDFILE:
        service.stop(config)  # clears the stale pid file
    releases = _releases(config)
    warning = None
    if os.geteuid() == 0:
        endpoint, run_as, pid_written = _set_up_as_root(config, allow_root, foreground)
    else:
        warning = _unprivileged_warning(config)
        endpoint, run_as, pid_written = _endpoint(config), None, False
    try:
        server = _build(config, releases, endpoint, run_as)
        service.setup_logging(config.log_file)
        if foreground and not pid_written:
            service.write_pid_file(config.pid_file, os.getpid())
    except BaseException:
        endpoint.sock.close()
        if pid_written:
            service.remove_pid_file(config.pid_file, os.getpid())
        raise
    if warning is not None:
        print(f"stap-server: {warning}", file=sys.stderr)
    if not foreground:
        service.check_pid_file_writable(config.pid_file)
        child = service.daemonize(config.pid_file)
        if child is not None:
            print(f"stap-server (pid {child}) started on https://{_where(config)}")
            return lsb.EXIT_OK
    LOG.info(
        "started: stap-server %s, %s, listening on %s, releases %s, certificate %s, "
        "%d compile workers, running as uid %d",
        __version__,
        server.info.stap_version,
        _where(config),
        " ".join(server.info.releases),
        server.info.fingerprint,
        config.workers,
        os.getuid(),
    )
    if warning is not None:
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

    def shutdown() -> None:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.compiler.kill_all()
        LOG.info("stopped")

    clean = service.serve(server.httpd.serve_forever, shutdown)
    service.remove_pid_file(config.pid_file, os.getpid())
    return lsb.EXIT_OK if clean else lsb.EXIT_FAILED


def _where(config: ServerConfig) -> str:
    host = config.listen_address
    return f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"
