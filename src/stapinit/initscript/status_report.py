"""What ``status`` says about one script: a typed record, as text (LSB) or JSON."""

from __future__ import annotations

from typing import NamedTuple

from stapinit.core.runtime import RuntimeKind, State

# LSB's wording (spec §2.2.4), as upstream's initscript prints it.
_LINES = {
    State.RUNNING: "{name} is running...",
    State.STARTING: "{name} is starting...",
    State.EXITED: "{name} ran and exited (status {exit_status})",
    State.DEAD: "{name} is dead, but pidfile exists",
    State.FOREIGN: "{name} is dead, but another script is running.",
    State.STOPPED: "{name} is stopped",
}


class ScriptStatus(NamedTuple):
    """One script's state, its requirements and its cache."""

    name: str
    state: State
    pid: int | None
    runtime: RuntimeKind
    requires: tuple[str, ...]
    requires_not_running: tuple[str, ...]
    cache: str  # "valid" or "stale: why"
    module: str
    exit_status: int | None = None  # for a one-shot script that ran and exited

    def describe(self) -> str:
        """The LSB-style lines ``status`` prints."""
        if self.state is State.RUNNING and self.pid:
            line = f"{self.name}({self.pid}) is running..."
        else:
            line = _LINES[self.state].format(name=self.name, exit_status=self.exit_status)
        if self.requires:
            line += f"\n  requires: {' '.join(self.requires)}"
            if self.requires_not_running:
                line += f" ({' '.join(self.requires_not_running)} not running)"
        return line

    def to_json(self) -> dict[str, object]:
        """The JSON object ``status --json`` prints for this script."""
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": self.pid,
            "runtime": self.runtime,
            "requires": list(self.requires),
            "requires_not_running": list(self.requires_not_running),
            "cache": self.cache,
            "module": self.module,
            "exit_status": self.exit_status,
        }
