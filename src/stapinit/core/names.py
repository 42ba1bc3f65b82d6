"""What a script name may be (spec §3.3)."""

from __future__ import annotations

import re
from typing import Final

# A script's name becomes a shell variable prefix, a kernel module name and a
# file name under CACHE_PATH and STAT_PATH.
NAME_PATTERN: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: The longest module name stap keeps: it truncates ``-m`` names from
#: ``MODULE_NAME_LEN - 1`` (56 - 1 on 64-bit kernels) characters on
#: (upstream ``session.cxx``), so a longer script could never be found again.
MAX_NAME_LENGTH: Final = 55


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a script name (one phrase), or ``None`` when it can."""
    if NAME_PATTERN.fullmatch(name) is None:
        return "a script name is a letter or _ followed by letters, digits and _"
    if len(name) > MAX_NAME_LENGTH:
        return (
            f"it is {len(name)} characters long; stap truncates module names"
            f" to {MAX_NAME_LENGTH}, so it could never be run"
        )
    return None


def is_valid_name(name: str) -> bool:
    """True when ``name`` can be a script name."""
    return name_problem(name) is None
