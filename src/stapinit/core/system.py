"""Facts about the host that several commands share.

Kept apart from :mod:`stapinit.protocol` (the compile server's wire format) so
that what the server, the loader and their children take for granted about the
system is written down once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

#: The ``PATH`` given to every program run on the user's behalf (stap, staprun,
#: stapbpf and what they start): the system directories only, never the
#: caller's, so nobody can put a program of their own in its place.
SYSTEM_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def tool_environment(base: Mapping[str, str], euid: int) -> dict[str, str]:
    """The environment for the SystemTap tools a command runs, from the caller's ``base``.

    As root (``euid`` 0) nothing in it may come from another user's files:
    ``HOME`` becomes root's own (stap reads ``$HOME/.systemtap/rc`` for extra
    options, and keeps its cache there), and every ``SYSTEMTAP_*`` variable
    (``SYSTEMTAP_DIR``, ``SYSTEMTAP_TAPSET``, ``SYSTEMTAP_RUNTIME`` …, stap(1))
    is dropped — ``sudo -E`` would otherwise hand root a user's settings.
    Other users get ``base`` unchanged: their tools, their settings.
    """
    if euid != 0:
        return dict(base)
    import pwd

    env = {key: value for key, value in base.items() if not key.startswith("SYSTEMTAP_")}
    try:
        env["HOME"] = pwd.getpwuid(euid).pw_dir
    except KeyError:
        env["HOME"] = "/root"
    return env
