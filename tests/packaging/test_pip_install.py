"""A plain ``pip install .`` (no extras) into a fresh virtualenv gives working commands."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.packaging.conftest import REPO
from tests.support.prefix import Prefix

#: Lists the console scripts the installed distribution declares, as JSON.
ENTRY_POINTS = """
import importlib.metadata, json
dist = importlib.metadata.distribution("systemtap-initscript")
print(json.dumps({e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}))
"""


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv on the base interpreter with ``pip install SOURCE``, no extras.

    The source is a copy of what the distribution is built from, so that the build
    writes nothing into the repository.
    """
    base = tmp_path_factory.mktemp("plain-install")
    source = base / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    venv = base / "venv"
    python = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def test_every_installed_command_runs_after_a_plain_install(plain_venv: Path) -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    listed = subprocess.run(
        [str(plain_venv / "bin" / "python"), "-c", ENTRY_POINTS],
        capture_output=True,
        text=True,
        check=True,
    )
    installed: dict[str, str] = json.loads(listed.stdout)
    assert installed == declared
    for command in installed:
        done = subprocess.run(
            [str(plain_venv / "bin" / command), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (done.returncode, done.stderr) == (0, ""), command
        assert "usage" in done.stdout.lower(), command


def test_the_boot_time_command_imports_no_cryptography(plain_venv: Path, tmp_path: Path) -> None:
    """systemtap-service runs at boot: it must stay light though cryptography is installed."""
    prefix = Prefix(tmp_path / "prefix")
    done = subprocess.run(
        [
            str(plain_venv / "bin" / "python"),
            "-X",
            "importtime",
            str(plain_venv / "bin" / "systemtap-service"),
            "status",
            "-c",
            str(prefix.config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert "stapinit" in imported  # it did run, from the plain install
    assert "Traceback" not in done.stderr
    assert not [name for name in imported if name.split(".")[0] == "cryptography"]
    # And cryptography is there to be imported: the other commands need it.
    check = subprocess.run(
        [str(plain_venv / "bin" / "python"), "-c", "import cryptography.x509"], check=False
    )
    assert check.returncode == 0
