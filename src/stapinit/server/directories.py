"""The server's directories: made, owned and checked as root before anything is read.

The state directory and the part holding the identity belong to root; the
cache and the compile directories to the user the server runs as; missing pid
and log locations are made for the service user.  See :func:`prepare_paths`.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from stapinit.core.fsutil import set_mode
from stapinit.core.lsb import EXIT_NOT_CONFIGURED
from stapinit.server.account import ServiceUser
from stapinit.server.config import ServerConfig
from stapinit.server.errors import StapServerError, path_error


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

    Raises StapServerError naming the setting and path.
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
                set_mode(directory, mode, (user.uid, user.gid))
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
        raise StapServerError(
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
            raise StapServerError(
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
        # By descriptor: a symlink swapped in since the mkdir is refused, never followed.
        set_mode(path, mode, owner)
