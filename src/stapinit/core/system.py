"""Facts about the host that several commands share.

Kept apart from :mod:`stapinit.protocol` (the compile server's wire format) so
that what the server, the loader and their children take for granted about the
system is written down once.
"""

from __future__ import annotations

from typing import Final

#: The ``PATH`` given to every program run on the user's behalf (stap, staprun,
#: stapbpf and what they start): the system directories only, never the
#: caller's, so nobody can put a program of their own in its place.
SYSTEM_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
