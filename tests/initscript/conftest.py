from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.prefix import SUPPORT, Prefix


@pytest.fixture
def bpf_prefix(tmp_path: Path, stapbpf_wrapper: Path) -> Iterator[Prefix]:
    """A prefix using the real stap and the real stapbpf."""
    prefix = Prefix(tmp_path / "prefix", {"STAPBPF": str(stapbpf_wrapper)})
    yield prefix
    prefix.kill_leftovers()


class FakeTools:
    """Where the stand-in stap/staprun record their calls and loaded modules."""

    def __init__(self, root: Path) -> None:
        self.calls = root / "calls.jsonl"
        self.modules = root / "modules"
        self.modules.write_text("")
        self.env = {"FAKE_CALLS": str(self.calls), "FAKE_MODULES": str(self.modules)}

    def calls_of(self, tool: str) -> list[list[str]]:
        if not self.calls.exists():
            return []
        entries: list[dict[str, Any]] = [
            json.loads(line) for line in self.calls.read_text().splitlines()
        ]
        return [entry["argv"] for entry in entries if entry["tool"] == tool]

    def loaded(self) -> list[str]:
        return [line.split()[0] for line in self.modules.read_text().splitlines() if line.strip()]

    def prefix(self, root: Path) -> Prefix:
        """A prefix whose stap/staprun are these stand-ins and MODULES_LIST their file."""
        return Prefix(
            root,
            {
                "STAP": str(SUPPORT / "fake_stap.py"),
                "STAPRUN": str(SUPPORT / "fake_staprun.py"),
                "MODULES_LIST": str(self.modules),
            },
            env=self.env,
        )


@pytest.fixture
def fake_tools(tmp_path: Path) -> FakeTools:
    return FakeTools(tmp_path)


@pytest.fixture
def kmod_prefix(tmp_path: Path, fake_tools: FakeTools) -> Iterator[Prefix]:
    """A prefix whose stap/staprun are stand-ins and MODULES_LIST a file."""
    prefix = fake_tools.prefix(tmp_path / "prefix")
    yield prefix
    prefix.kill_leftovers()
