from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The system tools these tests run (logrotate, update-rc.d, dpkg's maintainer
# scripts) live in sbin, which a caller's PATH may lack.
SYSTEM_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


@dataclass(frozen=True)
class Installed:
    """A ``make install``: where files landed (``root``) and the paths they name."""

    root: Path  # DESTDIR, or / for an install that runs where it lies
    prefix: Path
    sysconfdir: Path
    localstatedir: Path

    def path(self, installed: Path) -> Path:
        """Where an installed path is on this machine."""
        return self.root / installed.relative_to("/")

    @property
    def command(self) -> Path:
        return self.path(self.prefix / "sbin" / "systemtap-service")


def make_install(*variables: str) -> None:
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), "install", *variables],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def staged(tmp_path: Path) -> Installed:
    """``make install DESTDIR=... PREFIX=/usr``, as the Debian package does."""
    make_install(f"DESTDIR={tmp_path / 'stage'}", "PREFIX=/usr")
    return Installed(tmp_path / "stage", Path("/usr"), Path("/etc"), Path("/var"))


@pytest.fixture
def relocated(tmp_path: Path) -> Installed:
    """An install that runs where it lies: every directory under ``tmp_path``."""
    prefix, etc, var = tmp_path / "usr", tmp_path / "etc", tmp_path / "var"
    make_install(f"PREFIX={prefix}", f"SYSCONFDIR={etc}", f"LOCALSTATEDIR={var}")
    return Installed(Path("/"), prefix, etc, var)
