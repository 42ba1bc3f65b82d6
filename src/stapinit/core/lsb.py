"""Exit codes of LSB init scripts, shared by every service command.

For actions: 0 success, 1 generic failure, 2 wrong usage, 4 not enough
privilege, 5 not installed, 6 not configured. For ``status``: 0 running,
1 dead with a pid/status file, 3 not running, 4 unknown.
"""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_PRIVILEGE: Final = 4
EXIT_NOT_INSTALLED: Final = 5
EXIT_NOT_CONFIGURED: Final = 6
STATUS_DEAD_WITH_PIDFILE: Final = 1
STATUS_NOT_RUNNING: Final = 3
STATUS_UNKNOWN: Final = 4
