"""Real bash as the oracle for the configuration parser.

:func:`bash_source` runs ``set -a; source FILE`` in ``bash --norc --noprofile``
started with exactly the given environment (``env -i``), in an empty working
directory, and reports each asked variable's value as bash holds it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from stapinit.core.bashvars import parse_assignments

BASH = shutil.which("bash") or "/bin/bash"
_PRINT = (
    'set -a; source "$1" || exit 99; shift; '
    'for n; do if [[ -v $n ]]; then printf "s%s\\0" "${!n}"; else printf "u\\0"; fi; done'
)


@dataclass(frozen=True)
class BashResult:
    """``values``: name -> value, None when unset; ``returncode``/``stderr`` of bash."""

    values: dict[str, str | None]
    returncode: int
    stderr: str


def bash_source(
    text: str, environment: Mapping[str, str], names: Iterable[str], workdir: Path
) -> BashResult:
    """Source ``text`` (written as UTF-8 with surrogateescape) in real bash."""
    names = sorted(set(names))
    config = workdir / "config"
    config.write_bytes(text.encode("utf-8", "surrogateescape"))
    empty = workdir / "cwd"
    empty.mkdir(exist_ok=True)
    env_args = [f"{key}={value}" for key, value in environment.items()]
    done = subprocess.run(
        [
            "env",
            "-i",
            *env_args,
            BASH,
            "--norc",
            "--noprofile",
            "-c",
            _PRINT,
            "bash",
            config,
            *names,
        ],
        cwd=empty,
        capture_output=True,
        timeout=30,
        check=False,
    )
    fields = done.stdout.decode("utf-8", "surrogateescape").split("\0")[:-1]
    values: dict[str, str | None] = {}
    if done.returncode == 0:
        assert len(fields) == len(names), (done, names)
        values = {n: (f[1:] if f[0] == "s" else None) for n, f in zip(names, fields, strict=True)}
    return BashResult(values, done.returncode, done.stderr.decode("utf-8", "replace"))


def our_values(
    text: str, environment: Mapping[str, str], names: Iterable[str]
) -> dict[str, str | None]:
    """The parser's final value of each of ``names`` (None when unset)."""
    final: dict[str, str] = dict(environment)
    for assignment in parse_assignments(text, "config", environment):
        final[assignment.name] = assignment.value
    return {name: final.get(name) for name in names}
