"""What a script name may be (spec §3.3)."""

from __future__ import annotations

import re

# A script's name becomes a shell variable prefix, a kernel module name and a
# file name under CACHE_PATH and STAT_PATH.
NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_valid_name(name: str) -> bool:
    """True when ``name`` can be a script name."""
    return NAME_PATTERN.fullmatch(name) is not None
