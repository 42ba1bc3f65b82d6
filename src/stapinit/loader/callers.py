"""Who is asking: the caller of a connection, as the kernel and the system databases say.

Nothing a client sends says who it is: the uid comes from ``SO_PEERCRED``
(unix(7)) and the groups from the group database.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct

from stapinit.loader.policy import Caller, Host


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of ``conn``, from the kernel."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[1]
    return uid


def caller_from_uid(uid: int) -> Caller:
    """Name, groups and primary group of ``uid`` from the system's databases.

    Raises KeyError for a uid the user database does not know.
    """
    entry = pwd.getpwuid(uid)
    names: set[str] = set()
    for gid in os.getgrouplist(entry.pw_name, entry.pw_gid):
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(gid).gr_name)
    return Caller(uid, entry.pw_name, frozenset(names), entry.pw_gid)


def this_host() -> Host:
    """The kernel release and architecture modules must have been signed for."""
    uname = os.uname()
    return Host(uname.release, uname.machine)
