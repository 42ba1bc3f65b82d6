"""The throw-away systemtap-service prefix every benchmark lays out."""

from __future__ import annotations

from pathlib import Path

#: Directories of a prefix, by the setting that names them.
DIRECTORIES = {
    "SCRIPT_PATH": "script.d",
    "CONFIG_PATH": "conf.d",
    "CACHE_PATH": "cache",
    "TEMP_PATH": "tmp",
    "STAT_PATH": "run",
}


def lay_out(root: Path, **settings: str) -> Path:
    """Make the directories under ``root`` and write ``root/config``; return the config.

    ``LOG_FILE`` is ``root/log``; ``settings`` (``STAP=...``) are added as given.
    """
    for sub in DIRECTORIES.values():
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = [f"{key}={root / sub}" for key, sub in DIRECTORIES.items()]
    lines.append(f"LOG_FILE={root / 'log'}")
    lines += [f"{key}={value}" for key, value in settings.items()]
    config = root / "config"
    config.write_text("\n".join(lines) + "\n")
    return config


FAKE_STAP = """#!/bin/sh
# stap -p4 -m NAME ... FILE: write NAME.ko in the working directory
while [ $# -gt 0 ]; do [ "$1" = -m ] && name=$2; shift; done
: > "$name.ko"; echo "$name.ko"
"""
FAKE_STAPRUN = """#!/bin/sh
# staprun -L MODULE.ko | staprun -d NAME, against the list in $MODULES; several
# run at once (START_JOBS), so each holds a lock while it changes the list.
exec 9>>"$MODULES.lock"
flock 9
case "$1" in
-L) name=$(basename "$2" .ko); echo "$name 1 0 - Live 0x0" >> "$MODULES" ;;
-d) grep -v "^$2 " "$MODULES" > "$MODULES.new"; mv "$MODULES.new" "$MODULES" ;;
esac
"""


def stand_ins(root: Path) -> dict[str, str]:
    """Write sh stand-ins for ``stap`` and ``staprun`` (they cost almost nothing); their settings.

    The service's own overhead is what remains once they are in place.
    """
    for name, text in (("stap", FAKE_STAP), ("staprun", FAKE_STAPRUN)):
        (root / name).write_text(text)
        (root / name).chmod(0o755)
    (root / "modules").write_text("")
    return {"STAP": f"{root}/stap", "STAPRUN": f"{root}/staprun", "MODULES_LIST": f"{root}/modules"}
