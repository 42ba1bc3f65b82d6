"""Status files: ``STAT_PATH/NAME`` exists while a script runs (spec §3.7)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from stapinit.core.fsutil import atomic_write
from stapinit.core.names import is_valid_name


class StatusRecord(NamedTuple):
    """What a status file says about a started script."""

    name: str
    runtime: str
    pid: int  # 0 for a detached kernel module (staprun -L)
    start_time: int  # the process's start time in clock ticks since boot; 0 if no process
    module: str

    def to_text(self) -> str:
        """Serialise as ``key=value`` lines."""
        return (
            f"name={self.name}\nruntime={self.runtime}\npid={self.pid}\n"
            f"start_time={self.start_time}\nmodule={self.module}\n"
        )

    @classmethod
    def from_text(cls, name: str, text: str) -> StatusRecord | None:
        """Parse a status file; ``None`` when it is not a record we wrote for ``name``.

        Anything else in STAT_PATH (a stray pid file, a typo'd STAT_PATH such
        as /var/run) is never taken for a script, so stop never removes it.
        """
        fields = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
        if fields.get("name") != name or fields.get("runtime") not in ("kmod", "bpf"):
            return None

        def number(key: str) -> int:
            value = fields.get(key, "0")
            return int(value) if value.isdigit() else 0

        return cls(
            name, fields["runtime"], number("pid"), number("start_time"), fields.get("module", "")
        )


def status_file(stat_path: Path, name: str) -> Path:
    """The status file of script ``name``."""
    return stat_path / name


def read(stat_path: Path, name: str) -> StatusRecord | None:
    """The status record of ``name``, or ``None`` when it has none."""
    if not is_valid_name(name):
        return None
    try:
        text = status_file(stat_path, name).read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return StatusRecord.from_text(name, text)


def write(stat_path: Path, record: StatusRecord) -> None:
    """Create or replace the status file atomically (it lives in /run: no fsync)."""
    atomic_write(status_file(stat_path, record.name), record.to_text().encode(), durable=False)


def remove(stat_path: Path, name: str) -> None:
    """Delete the status file, if any."""
    status_file(stat_path, name).unlink(missing_ok=True)


def recorded_names(stat_path: Path) -> list[str]:
    """Names of every script that has a status file of ours."""
    try:
        candidates = sorted(p.name for p in stat_path.iterdir() if p.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [name for name in candidates if read(stat_path, name) is not None]
