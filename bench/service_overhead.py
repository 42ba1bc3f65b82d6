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

from layout import lay_out, stand_ins

COMMAND = str(Path(sys.executable).parent / "systemtap-service")


def make_prefix(root: Path, count: int, chained: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = lay_out(root, **stand_ins(root))
    conf = []
    for i in range(count):
        (root / "script.d" / f"s{i}.stp").write_text("probe begin {}\n")
        if chained and i:
            conf.append(f"s{i}_REQ=s{i - 1}")
    (root / "conf.d" / "all.conf").write_text("\n".join(conf) + "\n")
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
