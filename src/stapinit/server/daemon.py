"""Assembling and running the server: identity, compiler, cache, HTTPS, pid file.

Everything is checked before the server goes to the background, so a bad key, a
missing stap or a busy port is reported by ``stap-server start`` itself.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from stapinit import __version__
from stapinit.protocol import ServerInfo
from stapinit.server import service
from stapinit.server.app import CompileService, CompileSlots
from stapinit.server.cache import CompileCache
from stapinit.server.compiler import Compiler, CompilerSetupError, Limits, RunAs
from stapinit.server.config import ServerConfig
from stapinit.server.httpd import LOG, StapHTTPServer, make_ssl_context
from stapinit.server.identity import Identity, IdentityError, expires_soon, load_or_create
from stapinit.server.service import ServiceError

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
                service.EXIT_NOT_CONFIGURED,
            )
        return found
    for release in config.releases:
        if not (MODULES_DIR / release / "build").exists():
            raise ServiceError(
                f"RELEASES names {release}, but {MODULES_DIR / release / 'build'} does not exist",
                service.EXIT_NOT_CONFIGURED,
            )
    return config.releases


@dataclass
class _Server:
    httpd: StapHTTPServer
    compiler: Compiler
    info: ServerInfo
    identity: Identity


def _build(config: ServerConfig, run_as: RunAs | None) -> _Server:
    """Everything the server needs, checked before going to the background."""
    releases = _releases(config)
    try:
        identity = load_or_create(config.cert_dir, config.cert_days)
        ssl_context = make_ssl_context(identity)
    except IdentityError as exc:
        raise ServiceError(str(exc), service.EXIT_NOT_CONFIGURED) from None
    except OSError as exc:
        raise ServiceError(
            f"cannot use the server identity in {config.cert_dir}: {exc.strerror or exc}",
            service.EXIT_PRIVILEGE,
        ) from None
    try:
        compiler = Compiler(
            config.stap,
            config.state_dir / "tmp",
            Limits(config.compile_timeout, config.compile_memory),
            run_as,
        )
        stap_version = compiler.version()
    except CompilerSetupError as exc:
        raise ServiceError(str(exc), service.EXIT_NOT_INSTALLED) from None
    except OSError as exc:
        raise ServiceError(f"cannot prepare {config.state_dir / 'tmp'}: {exc}") from None
    short = re.search(r"version ([^\s,)]+)", stap_version)
    info = ServerInfo(
        version=__version__,
        stap_version=short[1] if short else stap_version,
        arch=platform.machine(),
        releases=releases,
        fingerprint=identity.fingerprint,
    )
    try:
        cache = (
            CompileCache(config.state_dir / "cache", config.cache_size)
            if config.cache_size > 0
            else None
        )
    except OSError as exc:
        raise ServiceError(f"cannot prepare {config.state_dir / 'cache'}: {exc}") from None
    app = CompileService(
        info,
        identity,
        compiler,
        cache,
        CompileSlots(config.workers, config.queue_size),
        stap_version,
        config.queue_timeout,
    )
    try:
        httpd = StapHTTPServer(
            (config.listen_address, config.port),
            app,
            ssl_context,
            config.io_timeout,
            config.max_connections,
            config.max_request_size,
        )
    except OSError as exc:
        raise ServiceError(
            f"cannot listen on {config.listen_address}:{config.port}: {exc.strerror or exc}"
        ) from None
    return _Server(httpd, compiler, info, identity)


def start(config: ServerConfig, allow_root: bool, foreground: bool) -> int:
    """Start the server (in the background unless ``foreground``); the exit status."""
    code, message = service.status(config)
    if code == service.EXIT_OK:
        print(message)
        return service.EXIT_OK
    if code == service.EXIT_DEAD:
        service.stop(config)  # clears the stale pid file
    run_as = None
    if os.geteuid() == 0:
        user = service.lookup_user(config.user)
        if user.uid == 0:
            # Scripts must never be compiled as root, --allow-root or not.
            raise ServiceError(
                f"USER={config.user} is root; set USER to an unprivileged account "
                "such as stap-server",
                service.EXIT_NOT_CONFIGURED,
            )
        service.prepare_paths(config, user)
        if allow_root:
            run_as = RunAs(user.uid, user.gid)
        else:
            service.drop_privileges(user)
    server = _build(config, run_as)
    service.setup_logging(config.log_file)
    if foreground:
        service.write_pid_file(config.pid_file, os.getpid())
    else:
        service.check_pid_file_writable(config.pid_file)
        child = service.daemonize(config.pid_file)
        if child is not None:
            print(f"stap-server (pid {child}) started on https://{_where(config)}")
            return service.EXIT_OK
    LOG.info(
        "started: stap-server %s, %s, listening on %s, releases %s, certificate %s, "
        "%d compile workers",
        __version__,
        server.info.stap_version,
        _where(config),
        " ".join(server.info.releases),
        server.info.fingerprint,
        config.workers,
    )
    if expires_soon(server.identity):
        LOG.warning(
            "certificate %s expires on %s; renew it (see the config file)",
            server.identity.cert_path,
            f"{server.identity.cert.not_valid_after_utc:%Y-%m-%d}",
        )

    def shutdown() -> None:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.compiler.kill_all()
        LOG.info("stopped")

    clean = service.serve(server.httpd.serve_forever, shutdown)
    service.remove_pid_file(config.pid_file, os.getpid())
    return service.EXIT_OK if clean else service.EXIT_FAILED


def _where(config: ServerConfig) -> str:
    host = config.listen_address
    return f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"
