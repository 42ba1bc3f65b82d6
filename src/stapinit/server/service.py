"""Service control: pid file, status, stop, daemonizing, and the serving loop.

Exit codes follow LSB: ``status`` answers 0 running, 1 dead with a pid file,
3 not running; other actions answer 0 on success, 1 on failure, 4 without the
privilege needed, 5 when something required is not installed, 6 when the
configuration (or the server identity) is unusable.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import logging.handlers
import os
import pwd
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from stapinit.core.fsutil import atomic_write
from stapinit.core.lsb import (
    EXIT_FAILED,
    EXIT_NOT_CONFIGURED,
    EXIT_NOT_INSTALLED,
    EXIT_OK,
    EXIT_PRIVILEGE,
    STATUS_DEAD_WITH_PIDFILE,
    STATUS_NOT_RUNNING,
)
from stapinit.server.config import ServerConfig

LOG: Final = logging.getLogger("stap-server")

STOP_TIMEOUT: Final = 15.0


class ServiceError(Exception):
    """An action failed; ``str()`` is one line and ``code`` the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def path_error(action: str, path: Path, exc: OSError) -> ServiceError:
    """``cannot ACTION PATH: reason``, exit 4 when permissions are at fault, else 6."""
    code = EXIT_PRIVILEGE if exc.errno in (errno.EACCES, errno.EPERM) else EXIT_NOT_CONFIGURED
    return ServiceError(f"cannot {action} {path}: {exc.strerror or exc}", code)


# --- pid file ------------------------------------------------------------------------


def read_pid(pid_file: Path) -> int | None:
    """The pid recorded in ``pid_file``; None when there is none; 0 when unreadable."""
    try:
        text = pid_file.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise path_error("read PID_FILE", pid_file, exc) from None
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else 0


def write_pid_file(pid_file: Path, pid: int) -> None:
    """Record ``pid`` through a temp file and a rename."""
    try:
        atomic_write(pid_file, f"{pid}\n".encode("ascii"), durable=False)
    except OSError as exc:
        raise path_error("write PID_FILE", pid_file, exc) from None


def remove_pid_file(pid_file: Path, pid: int) -> None:
    """Remove ``pid_file`` if it still names ``pid`` (a newer server may own it)."""
    with contextlib.suppress(OSError):
        if read_pid(pid_file) == pid:
            pid_file.unlink()


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a live stap-server process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # /proc hidden from us: trust the signal check
    # Guards against a recycled pid after a crash; zombies have an empty cmdline.
    return b"stap-server" in cmdline


# --- status / stop -------------------------------------------------------------------


def status(config: ServerConfig) -> tuple[int, str]:
    """LSB status code and a one-line description."""
    pid = read_pid(config.pid_file)
    if pid is None:
        return STATUS_NOT_RUNNING, "stap-server is stopped"
    if pid and is_running(pid):
        where = f"https://{config.listen_address}:{config.port}"
        return EXIT_OK, f"stap-server (pid {pid}) is running on {where}"
    return (
        STATUS_DEAD_WITH_PIDFILE,
        f"stap-server is dead but its pid file {config.pid_file} exists",
    )


def stop(config: ServerConfig) -> str:
    """Stop the running server (SIGTERM, then SIGKILL after a while); idempotent."""
    pid = read_pid(config.pid_file)
    if pid is None:
        return "stap-server is not running"
    if not pid or not is_running(pid):
        try:
            config.pid_file.unlink(missing_ok=True)
        except PermissionError:
            raise ServiceError(
                f"cannot remove stale pid file {config.pid_file}", EXIT_PRIVILEGE
            ) from None
        return "stap-server was not running (removed a stale pid file)"
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        raise ServiceError(
            f"not allowed to stop stap-server (pid {pid}); try as root", EXIT_PRIVILEGE
        ) from None
    if not _wait_gone(pid, STOP_TIMEOUT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, 5.0):
            raise ServiceError(f"stap-server (pid {pid}) did not stop")
    remove_pid_file(config.pid_file, pid)
    return f"stap-server (pid {pid}) stopped"


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not is_running(pid):
            return True
        time.sleep(0.05)
    return not is_running(pid)


# --- becoming the service user -------------------------------------------------------


@dataclass(frozen=True)
class ServiceUser:
    """The account the server (or at least stap) runs as."""

    name: str
    uid: int
    gid: int


def lookup_user(name: str) -> ServiceUser:
    """Resolve the service user; ServiceError when it does not exist."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(
            f"service user {name!r} does not exist; create it with: useradd --system "
            f"--home-dir /var/lib/stap-server --shell /usr/sbin/nologin {name}",
            EXIT_NOT_INSTALLED,
        ) from None
    return ServiceUser(name, entry.pw_uid, entry.pw_gid)


def prepare_paths(config: ServerConfig, user: ServiceUser, keep_root: bool) -> None:
    """As root, before the identity is read: the locations the server needs.

    The service user runs every compile, and a compile can make gcc include any
    file that user may read.  So ``STATE_DIR`` and the part of it holding the
    identity (``.systemtap/ssl/server``) belong to root and only root may change
    them: created (0755) when missing, taken back from the service user (the
    layout of earlier versions), refused when anyone else could change them.
    ``STATE_DIR/cache`` and ``STATE_DIR/tmp`` belong to the user the server runs
    as (root with ``keep_root``); one owned by anyone else is discarded, as it
    is only a cache.  Missing pid and log locations are created for the service
    user; existing ones are left as the administrator made them.

    Raises ServiceError naming the setting and path.
    """
    owner = (0, 0) if keep_root else (user.uid, user.gid)
    state = config.state_dir
    try:
        _root_directory(state, user.uid, follow=True)
    except OSError as exc:
        raise path_error("prepare STATE_DIR", state, exc) from None
    path = state
    for part in config.cert_dir.relative_to(state).parts:  # from the top: no swapping
        path /= part
        try:
            _root_directory(path, user.uid, follow=False)
        except OSError as exc:
            raise path_error("prepare", path, exc) from None
    for name, mode in (("cache", 0o700), ("tmp", 0o711)):
        try:
            _owned_directory(state / name, owner, mode)
        except OSError as exc:
            raise path_error("prepare", state / name, exc) from None
    for setting, directory, mode in (
        ("PID_FILE", config.pid_file.parent, 0o755),
        ("LOG_FILE", config.log_file.parent, 0o750),
    ):
        try:
            if os.path.lexists(directory) and not directory.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            if not directory.is_dir():
                directory.mkdir(mode=mode, parents=True)
                os.chown(directory, user.uid, user.gid)
        except OSError as exc:
            raise path_error(f"prepare the directory of {setting}", directory, exc) from None
    try:
        fd = os.open(config.log_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    except (FileExistsError, PermissionError):
        return  # there already, or the service user creates it (setup_logging)
    except OSError as exc:
        raise path_error("create LOG_FILE", config.log_file, exc) from None
    try:
        os.fchown(fd, user.uid, user.gid)
    finally:
        os.close(fd)


def _root_directory(path: Path, service_uid: int, follow: bool) -> None:
    """Make ``path`` a directory that only root can change (see :func:`prepare_paths`)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        path.mkdir(mode=0o755, parents=follow)
        fd = os.open(path, flags)
        os.fchmod(fd, 0o755)  # whatever the umask: the certificate is for everyone
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR) or not os.path.lexists(path):
            raise
        raise ServiceError(
            f"{path} must be a directory, not a file or a symbolic link: the server's "
            "identity lives there",
            EXIT_NOT_CONFIGURED,
        ) from None
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid == service_uid:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, 0o755)  # the service user still passes through to cache/ and tmp/
        elif info.st_uid != 0 or mode & 0o022:
            raise ServiceError(
                f"{path} must belong to root and be writable by root alone, since the "
                f"server's private key lives there (owner uid {info.st_uid}, mode "
                f"{mode:04o}); fix it with: chown root:root {path}; chmod go-w {path}",
                EXIT_NOT_CONFIGURED,
            )
    finally:
        os.close(fd)


def _owned_directory(path: Path, owner: tuple[int, int], mode: int) -> None:
    """Make ``path`` a directory of ``owner``, discarding one that someone else owns."""
    try:
        info: os.stat_result | None = path.lstat()
    except FileNotFoundError:
        info = None
    if info is not None and (not stat.S_ISDIR(info.st_mode) or info.st_uid != owner[0]):
        # From a run with(out) --allow-root, or given to root by systemd: start afresh.
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
        info = None
    if info is None:
        path.mkdir(mode=mode)
        os.chmod(path, mode)
        os.chown(path, *owner)


def drop_privileges(user: ServiceUser) -> None:
    """Become ``user`` for good (groups, gid, uid; in that order)."""
    try:
        os.initgroups(user.name, user.gid)
        os.setgid(user.gid)
        os.setuid(user.uid)
    except OSError as exc:
        raise ServiceError(
            f"cannot become USER {user.name}: {exc.strerror or exc}", EXIT_PRIVILEGE
        ) from None
    os.environ["HOME"] = pwd.getpwuid(user.uid).pw_dir


# --- logging, daemonizing, serving ---------------------------------------------------


def setup_logging(log_file: Path) -> None:
    """Send the request log to ``log_file`` (reopened when logrotate moves it)."""
    try:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        os.close(fd)
        handler = logging.handlers.WatchedFileHandler(log_file)
    except OSError as exc:
        raise path_error("open LOG_FILE", log_file, exc) from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


def daemonize(pid_file: Path) -> int | None:
    """Fork into the background.

    In the parent, records the child's pid and returns it; in the child (now a
    session leader with stdio on /dev/null) returns None.
    """
    pid = os.fork()
    if pid:
        write_pid_file(pid_file, pid)
        return pid
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return None


def check_pid_file_writable(pid_file: Path) -> None:
    """Fail early, before forking, if the pid file cannot be written."""
    if not os.access(pid_file.parent, os.W_OK | os.X_OK):
        raise ServiceError(
            f"cannot write pid file {pid_file}: {os.strerror(errno.EACCES)}",
            EXIT_PRIVILEGE,
        )


def serve(serve_forever: Callable[[], None], shutdown: Callable[[], None]) -> bool:
    """Serve until SIGTERM or SIGINT, then run ``shutdown`` (from the main thread).

    Returns False when the accept loop died on its own.
    """
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    thread = threading.Thread(target=serve_forever, name="accept", daemon=True)
    thread.start()
    clean = True
    while not stopping.wait(0.5):
        if not thread.is_alive():
            LOG.error("the accept loop ended unexpectedly")
            clean = False
            break
    shutdown()
    return clean
