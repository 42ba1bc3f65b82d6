"""Wall time of systemtap-service's own work: start, status and stop.

Stand-in ``stap`` and ``staprun`` written in plain sh cost almost nothing, so
the figures are this tool's overhead with a warm cache. Usage:

    .venv/bin/python bench/service_overhead.py [--sizes 1,50,500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMAND = str(Path(sys.executable).parent / "systemtap-service")

FAKE_STAP = """#!/bin/sh
# stap -p4 -m NAME ... FILE: write NAME.ko in the working directory
while [ $# -gt 0 ]; do [ "$1" = -m ] && name=$2; shift; done
: > "$name.ko"; echo "$name.ko"
"""
FAKE_STAPRUN = """#!/bin/sh
# staprun -L MODULE.ko | staprun -d NAME, against the list in $MODULES
# (under a lock: scripts of one level start and stop in parallel)
exec 9>"$MODULES.lock"; flock 9
case "$1" in
-L) name=$(basename "$2" .ko); echo "$name 1 0 - Live 0x0" >> "$MODULES" ;;
-d) grep -v "^$2 " "$MODULES" > "$MODULES.new"; mv "$MODULES.new" "$MODULES" ;;
esac
"""


def make_prefix(root: Path, count: int, chained: bool) -> Path:
    for sub in ("script.d", "conf.d", "cache", "tmp", "run"):
        (root / sub).mkdir(parents=True)
    for name, text in (("stap", FAKE_STAP), ("staprun", FAKE_STAPRUN)):
        (root / name).write_text(text)
        (root / name).chmod(0o755)
    (root / "modules").write_text("")
    conf = []
    for i in range(count):
        (root / "script.d" / f"s{i}.stp").write_text("probe begin {}\n")
        if chained and i:
            conf.append(f"s{i}_REQ=s{i - 1}")
    (root / "conf.d" / "all.conf").write_text("\n".join(conf) + "\n")
    config = root / "config"
    config.write_text(
        "\n".join(
            [
                f"SCRIPT_PATH={root}/script.d",
                f"CONFIG_PATH={root}/conf.d",
                f"CACHE_PATH={root}/cache",
                f"TEMP_PATH={root}/tmp",
                f"STAT_PATH={root}/run",
                f"LOG_FILE={root}/log",
                f"STAP={root}/stap",
                f"STAPRUN={root}/staprun",
                f"MODULES_LIST={root}/modules",
            ]
        )
        + "\n"
    )
    return config


def timed(config: Path, command: str, root: Path, expect: int = 0) -> float:
    began = time.perf_counter()
    done = subprocess.run(
        [COMMAND, command, "-c", str(config)],
        capture_output=True,
        text=True,
        env={"MODULES": str(root / "modules"), "PATH": "/usr/bin:/bin"},
    )
    elapsed = time.perf_counter() - began
    if done.returncode != expect:
        raise SystemExit(f"{command} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def standin_cost(root: Path, count: int) -> tuple[float, float]:
    """Seconds the stand-ins alone take for ``count`` loads and ``count`` unloads."""
    env = {"MODULES": str(root / "modules"), "PATH": "/usr/bin:/bin"}
    (root / "modules").write_text("")
    module = root / "x.ko"
    module.write_text("")
    began = time.perf_counter()
    for _ in range(count):
        subprocess.run([str(root / "staprun"), "-L", str(module)], env=env, check=True)
    loads = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(count):
        subprocess.run([str(root / "staprun"), "-d", "x"], env=env, check=True)
    return loads, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1,50,500")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print("median seconds; 'own' subtracts what the sh stand-ins themselves cost")
    header = ["start", "own", "status", "stop", "own"]
    print(f"{'scripts':>7} {'shape':<11} " + " ".join(f"{h:>7}" for h in header))
    for size in (int(s) for s in args.sizes.split(",")):
        for chained in (False, True):
            runs: dict[str, list[float]] = {"start": [], "status": [], "stop": []}
            loads: list[float] = []
            unloads: list[float] = []
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory() as tmp:
                    root = Path(tmp)
                    config = make_prefix(root, size, chained)
                    timed(config, "compile", root)  # warm the cache; not measured
                    runs["start"].append(timed(config, "start", root))
                    runs["status"].append(timed(config, "status", root))
                    runs["stop"].append(timed(config, "stop", root))
                    load, unload = standin_cost(root, size)
                    loads.append(load)
                    unloads.append(unload)
            shape = "chain" if chained else "independent"
            start, status, stop = (statistics.median(runs[c]) for c in ("start", "status", "stop"))
            own_start = start - statistics.median(loads)
            own_stop = stop - statistics.median(unloads)
            figures = [start, own_start, status, stop, own_stop]
            print(f"{size:>7} {shape:<11} " + " ".join(f"{f:>7.3f}" for f in figures))


if __name__ == "__main__":
    main()
