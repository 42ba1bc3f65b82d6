"""One base for every error a user may see, carrying its exit code.

Each program's ``main`` has one ``except StapinitError`` that prints ``str()``
(one line, naming the file, line, script or option at fault) and returns
``exit_code``. Exit codes are LSB's (:mod:`stapinit.core.lsb`).
"""

from __future__ import annotations

from stapinit.core.lsb import EXIT_FAILED, EXIT_NOT_CONFIGURED, EXIT_USAGE


class StapinitError(Exception):
    """An error meant for the user: ``str()`` is one line; ``exit_code`` the status.

    Subclasses set a class-wide ``exit_code``; an instance may override it.
    """

    exit_code: int = EXIT_FAILED

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(StapinitError):
    """The command line is wrong (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigFileError(StapinitError):
    """A configuration file cannot be used; ``str()`` is ``FILE:LINE: why`` (exit 6)."""

    exit_code = EXIT_NOT_CONFIGURED

    def __init__(self, filename: str, line: int, message: str) -> None:
        super().__init__(f"{filename}:{line}: {message}" if line else f"{filename}: {message}")
        self.filename = filename
        self.line = line
        self.message = message
