"""The loader's listening socket: the one systemd passes, or one bound here."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path

from stapinit.core.errors import StapinitError


class ListenerError(StapinitError):
    """There is no socket to listen on; ``str()`` is one line."""


def systemd_listener(environ: Mapping[str, str]) -> socket.socket | None:
    """The socket systemd passed us (socket activation, sd_listen_fds(3)), if any."""
    if environ.get("LISTEN_PID") != str(os.getpid()) or environ.get("LISTEN_FDS") != "1":
        return None
    sock = socket.socket(fileno=3)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ListenerError("the socket passed by systemd is not a Unix stream socket")
    return sock


def bind_listener(path: Path) -> socket.socket:
    """Listen on a Unix socket at ``path`` that every user may connect to (mode 0666).

    Anyone may connect because the policy, not the file mode, decides what a
    caller may do.  A stale socket left by a previous run is replaced; a live
    one, or any other file in the way, is an error.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(path)) == 0:
                raise ListenerError(f"another stap-loader is listening on {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind(2) creates the socket 0666 under this umask: no chmod by path afterwards,
    # which would follow a symlink swapped in at ``path`` in a directory others can
    # write. The loader binds before it starts any thread, so the umask is ours alone.
    umask = os.umask(0o111)
    try:
        sock.bind(str(path))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(umask)
    return sock
