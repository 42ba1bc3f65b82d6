"""Status files: ``STAT_PATH/NAME`` exists while a script runs (spec §3.7).

A record is written the moment a script's process exists (phase
``starting``) and completed when it is ready, so a start killed at any moment
leaves a record that ``status``, ``stop`` and the next ``start`` find.
"""

from __future__ import annotations

from pathlib import Path

from stapinit.core.fsutil import atomic_write
from stapinit.core.names import is_valid_name
from stapinit.core.runtime import RUNTIME_KINDS, Instance, Phase
from stapinit.core.safeio import read_regular

#: A record is a few short lines; anything bigger is not ours.
MAX_RECORD_BYTES = 4096
_PHASES: tuple[Phase, ...] = ("starting", "ready", "exited")


def to_text(record: Instance) -> str:
    """Serialise as ``key=value`` lines."""
    lines = [
        f"name={record.name}",
        f"runtime={record.kind}",
        f"pid={record.pid}",
        f"start_time={record.start_time}",
        f"module={record.module}",
        f"phase={record.phase}",
    ]
    if record.exit_status is not None:
        lines.append(f"exit_status={record.exit_status}")
    return "\n".join(lines) + "\n"


def from_text(name: str, text: str) -> Instance | None:
    """Parse a status file; ``None`` when it is not a record we wrote for ``name``.

    Anything else in STAT_PATH (a stray pid file, a typo'd STAT_PATH such
    as /var/run) is never taken for a script, so stop never removes it.
    """
    fields = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
    kind = next((k for k in RUNTIME_KINDS if k == fields.get("runtime")), None)
    if fields.get("name") != name or kind is None:
        return None
    phase = next((p for p in _PHASES if p == fields.get("phase", "ready")), None)
    if phase is None:
        return None

    def number(key: str) -> int:
        value = fields.get(key, "0")
        return int(value) if value.isdigit() and len(value) < 20 else 0

    status = fields.get("exit_status")
    exit_status = int(status) if status and status.isdigit() and len(status) < 4 else None
    return Instance(
        name,
        kind,
        number("pid"),
        number("start_time"),
        fields.get("module", ""),
        phase,
        exit_status,
    )


def status_file(stat_path: Path, name: str) -> Path:
    """The status file of script ``name``."""
    return stat_path / name


def read(stat_path: Path, name: str) -> Instance | None:
    """The status record of ``name``, or ``None`` when it has none we wrote.

    Never follows a symlink, never blocks on a FIFO, never reads more than
    :data:`MAX_RECORD_BYTES`: such entries are not records.
    """
    if not is_valid_name(name):
        return None
    try:
        data = read_regular(status_file(stat_path, name), MAX_RECORD_BYTES)
    except OSError:
        return None
    return from_text(name, data.decode("utf-8", errors="replace"))


def write(stat_path: Path, record: Instance) -> None:
    """Create or replace the status file atomically (it lives in /run: no fsync)."""
    atomic_write(status_file(stat_path, record.name), to_text(record).encode(), durable=False)


def remove(stat_path: Path, name: str) -> None:
    """Delete the status file, if any."""
    status_file(stat_path, name).unlink(missing_ok=True)


def recorded_names(stat_path: Path) -> list[str]:
    """Names of every script that has a status file of ours."""
    try:
        candidates = sorted(p.name for p in stat_path.iterdir() if is_valid_name(p.name))
    except OSError:
        return []
    return [name for name in candidates if read(stat_path, name) is not None]
