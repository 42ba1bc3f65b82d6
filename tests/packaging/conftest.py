from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stapinit import __version__

REPO = Path(__file__).resolve().parents[2]
# The system tools these tests run (logrotate, update-rc.d, dpkg's maintainer
# scripts) live in sbin, which a caller's PATH may lack.
SYSTEM_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
#: The binary packages debian/ builds, all from one source.
PACKAGES = ("systemtap-initscript", "systemtap-compile-server", "systemtap-compile-client")
#: The tests that install packages on this machine take it in turn, whichever
#: xdist worker runs them (they also share the xdist group "deb").
DPKG_LOCK = Path("/run/lock/stapinit-deb-tests.lock")


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


def make_install(*variables: str, target: str = "install") -> None:
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), target, *variables],
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


# --- the Debian packages --------------------------------------------------------------


@dataclass(frozen=True)
class BuiltDebs:
    """The .deb files of one ``dpkg-buildpackage`` run."""

    directory: Path

    def deb(self, package: str) -> Path:
        return self.directory / f"{package}_{__version__}_all.deb"


def source_tree(destination: Path) -> Path:
    """A copy of what the packages are built from, so the build writes nothing in the repo."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("debian", "data", "doc", "src/stapinit"):
        shutil.copytree(REPO / name, destination / name, ignore=ignore)
    for name in ("Makefile", "README.md"):
        shutil.copy(REPO / name, destination / name)
    return destination


@pytest.fixture(scope="session")
def built_debs(tmp_path_factory: pytest.TempPathFactory) -> BuiltDebs:
    """Every binary package, built once per worker by one ``dpkg-buildpackage -b``."""
    for tool in ("dpkg-buildpackage", "dh", "dh_python3"):
        if not shutil.which(tool, path=SYSTEM_PATH):
            pytest.fail(f"{tool} is not installed; run dev/setup-host")
    base = tmp_path_factory.mktemp("debs")
    source = source_tree(base / f"systemtap-initscript-{__version__}")
    built = subprocess.run(
        ["dpkg-buildpackage", "-b", "-us", "-uc"],
        capture_output=True,
        text=True,
        cwd=source,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PATH": SYSTEM_PATH},
    )
    if built.returncode != 0:
        pytest.fail("dpkg-buildpackage failed:\n" + built.stdout[-3000:] + built.stderr[-3000:])
    debs = BuiltDebs(base)
    for package in PACKAGES:
        assert debs.deb(package).is_file(), package
    return debs


def unit_dir(shipped: set[str]) -> Path:
    """The one directory a package's systemd units are in (``shipped``: its paths).

    Debian 12 packages put them in /lib/systemd/system, Debian 13 ones in
    /usr/lib/systemd/system (debian/rules follows the release's debhelper); either
    way it must be a directory this machine's systemd loads units from.
    """
    dirs = {
        str(Path(path).parent)
        for path in shipped
        if Path(path).parent.name == "system" and Path(path).suffix in (".service", ".socket")
    }
    assert len(dirs) == 1, dirs
    paths = subprocess.run(
        ["systemd-analyze", "unit-paths"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert next(iter(dirs)) in paths, paths
    return Path(next(iter(dirs)))


@pytest.fixture
def dpkg_turn() -> Iterator[None]:
    """Hold the machine's packages for this test alone."""
    DPKG_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with DPKG_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
