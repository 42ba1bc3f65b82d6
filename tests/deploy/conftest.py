from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.prefix import Prefix

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
    target.kill_leftovers()
    build.kill_leftovers()
