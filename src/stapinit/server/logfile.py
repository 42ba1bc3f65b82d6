"""The request log: one line per request, in ``LOG_FILE`` (reopened after logrotate)."""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path
from typing import Final

from stapinit.server.errors import path_error

LOG: Final = logging.getLogger("stap-server")


def setup_logging(log_file: Path) -> None:
    """Send the request log to ``log_file`` (reopened when logrotate moves it)."""
    try:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        os.close(fd)
        handler = logging.handlers.WatchedFileHandler(log_file)
    except OSError as exc:
        raise path_error("open LOG_FILE", log_file, exc) from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
