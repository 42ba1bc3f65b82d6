"""The error of the ``stap-server`` command: one line for the user, an LSB exit code.

Exit codes (LSB): ``status`` answers 0 running, 1 dead with a pid file, 3 not
running; other actions answer 0 on success, 1 on failure, 4 without the
privilege needed, 5 when something required is not installed, 6 when the
configuration (or the server identity) is unusable.
"""

from __future__ import annotations

import errno
from pathlib import Path

from stapinit.core.errors import StapinitError
from stapinit.core.lsb import EXIT_NOT_CONFIGURED, EXIT_PRIVILEGE


class StapServerError(StapinitError):
    """An action of ``stap-server`` failed; ``str()`` is one line, ``exit_code`` the status."""


def path_error(action: str, path: Path, exc: OSError) -> StapServerError:
    """``cannot ACTION PATH: reason``, exit 4 when permissions are at fault, else 6."""
    code = EXIT_PRIVILEGE if exc.errno in (errno.EACCES, errno.EPERM) else EXIT_NOT_CONFIGURED
    return StapServerError(f"cannot {action} {path}: {exc.strerror or exc}", code)
