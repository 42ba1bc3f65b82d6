"""The service user: the account the server (or at least every compile) runs as."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from stapinit.core.lsb import EXIT_NOT_INSTALLED, EXIT_PRIVILEGE
from stapinit.server.errors import StapServerError


@dataclass(frozen=True)
class ServiceUser:
    """The account named by ``USER``."""

    name: str
    uid: int
    gid: int


def lookup_user(name: str) -> ServiceUser:
    """Resolve the service user; :class:`StapServerError` (exit 5) when it does not exist."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise StapServerError(
            f"service user {name!r} does not exist; create it with: useradd --system "
            f"--home-dir /var/lib/stap-server --shell /usr/sbin/nologin {name}",
            EXIT_NOT_INSTALLED,
        ) from None
    return ServiceUser(name, entry.pw_uid, entry.pw_gid)


def drop_privileges(user: ServiceUser) -> None:
    """Become ``user`` for good (groups, gid, uid; in that order)."""
    try:
        os.initgroups(user.name, user.gid)
        os.setgid(user.gid)
        os.setuid(user.uid)
    except OSError as exc:
        raise StapServerError(
            f"cannot become USER {user.name}: {exc.strerror or exc}", EXIT_PRIVILEGE
        ) from None
    os.environ["HOME"] = pwd.getpwuid(user.uid).pw_dir
