"""A throw-away systemtap-service installation under one directory, for tests."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import shared_install

SUPPORT = Path(__file__).parent
COMMAND = str(Path(sys.executable).parent / "systemtap-service")
RELEASE = os.uname().release


def shared_command() -> str:
    """``systemtap-service`` from the copy every user can run."""
    return str(shared_install.bin_dir() / "systemtap-service")


@dataclass
class Prefix:
    """Config, scripts, cache, status and log directories under ``root``."""

    root: Path
    settings: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # for every run of the command

    def __post_init__(self) -> None:
        for sub in ("script.d", "conf.d", "cache", "tmp", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.settings = {
            "SCRIPT_PATH": str(self.scripts),
            "CONFIG_PATH": str(self.root / "conf.d"),
            "CACHE_PATH": str(self.root / "cache"),
            "TEMP_PATH": str(self.root / "tmp"),
            "STAT_PATH": str(self.stat),
            "LOG_FILE": str(self.log_file),
            "STOP_TIMEOUT": "5",
            **self.settings,
        }
        self.write_config()

    @property
    def scripts(self) -> Path:
        return self.root / "script.d"

    @property
    def stat(self) -> Path:
        return self.root / "run"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "systemtap.log"

    @property
    def config(self) -> Path:
        return self.root / "config"

    def cache_dir(self, release: str = RELEASE) -> Path:
        return self.root / "cache" / release

    def write_config(self, **overrides: str) -> None:
        self.settings.update(overrides)
        lines = [f"{key}='{value}'" for key, value in self.settings.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def add_script(self, name: str, text: str, options: str = "", requires: str = "") -> Path:
        path = self.scripts / f"{name}.stp"
        path.write_text(text)
        self.configure(name, options, requires)
        return path

    def configure(self, name: str, options: str = "", requires: str = "") -> None:
        """Write ``conf.d/NAME.conf`` with the script's options and requirements."""
        conf = self.root / "conf.d" / f"{name}.conf"
        conf.write_text(f"{name}_OPT={shlex.quote(options)}\n{name}_REQ={shlex.quote(requires)}\n")

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the installed command with this prefix's config."""
        return subprocess.run(
            [COMMAND, *args, "-c", str(self.config)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            env={**os.environ, **self.env, **(env or {})},
        )

    def run_as(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the command as ``user``, who is given read access to the prefix.

        It runs from the copy of the code every user can reach, since the checkout
        may be private to its owner (see ``shared_install``).
        """
        for path in (self.root, *self.root.parents):
            if path == Path("/"):
                break
            path.chmod(path.stat().st_mode | 0o005)
        return subprocess.run(
            ["runuser", "-u", user, "--", shared_command(), *args, "-c", str(self.config)],
            capture_output=True,
            text=True,
            check=False,
        )

    def status_json(self) -> dict[str, dict[str, Any]]:
        done = self.run("status", "--json")
        return {s["name"]: s for s in json.loads(done.stdout)["scripts"]}

    def kill_leftovers(self) -> None:
        """Kill whatever a failed test left running, so nothing outlives the suite."""
        for status_file in self.stat.glob("*"):
            if status_file.name.startswith(".") or not status_file.is_file():
                continue
            for line in status_file.read_text(errors="replace").splitlines():
                key, _, value = line.partition("=")
                pid = int(value) if key == "pid" and value.isdigit() else 0
                if pid > 0 and process_alive(pid):
                    os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"
