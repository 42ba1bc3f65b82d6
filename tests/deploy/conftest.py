from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.prefix import Prefix, process_alive

TICK = (
    "global n\n"
    'probe timer.ms(50) { n++; printf("tick %d\\n", n) }\n'
    'probe end { printf("end\\n") }\n'
)


@dataclass
class Hosts:
    """A build host that compiles, and a target with no compiler and no .stp files."""

    build: Prefix
    target: Prefix
    root: Path


def _stop_leftovers(prefix: Prefix) -> None:
    """Kill whatever a failed test left running, so nothing outlives the suite."""
    for status_file in prefix.stat.glob("*"):
        if status_file.name.startswith("."):
            continue
        for line in status_file.read_text().splitlines():
            key, _, value = line.partition("=")
            if key == "pid" and value.isdigit() and int(value) > 0 and process_alive(int(value)):
                os.kill(int(value), signal.SIGKILL)


@pytest.fixture
def hosts(tmp_path: Path, stapbpf_wrapper: Path) -> Iterator[Hosts]:
    """Two separate prefixes; the target's STAP does not exist, as on a production host."""
    build = Prefix(tmp_path / "build", {"STAPBPF": str(stapbpf_wrapper)})
    target = Prefix(
        tmp_path / "target",
        {
            "STAPBPF": str(stapbpf_wrapper),
            "STAP": str(tmp_path / "no-compiler" / "stap"),
            "AUTOCOMPILE": "no",
            "ALLOW_CACHEONLY": "yes",
        },
    )
    yield Hosts(build, target, tmp_path)
    _stop_leftovers(target)
    _stop_leftovers(build)
