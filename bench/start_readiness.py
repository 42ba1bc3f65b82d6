"""``start`` of real BPF scripts against the floor of spawning their stapbpf directly.

Both sides count until every script's probes are live (its ``begin`` probe
has run: see ``stapinit.core.runtimes.bpf.is_ready``), measured side by side
in one run, with a warm cache. Needs root, real stap and stapbpf (the memlock
shim of the tests is used, as on the project's VMs). Usage:

    .venv/bin/python bench/start_readiness.py [--count 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from layout import lay_out

from stapinit.core.runtimes.bpf import is_ready
from tests.support.tools import build_stapbpf_wrapper

COMMAND = str(Path(sys.executable).parent / "systemtap-service")
SCRIPT = 'probe begin { println("up") }\nprobe timer.s(60) { }\n'


def make_prefix(root: Path, count: int, chained: bool, stapbpf: Path) -> Path:
    root.mkdir(parents=True)
    config = lay_out(root, STAPBPF=str(stapbpf))
    conf = []
    for i in range(count):
        (root / "script.d" / f"s{i}.stp").write_text(SCRIPT)
        conf.append(f"s{i}_OPT=--runtime=bpf")
        if chained and i:
            conf.append(f"s{i}_REQ=s{i - 1}")
    (root / "conf.d" / "all.conf").write_text("\n".join(conf) + "\n")
    subprocess.run([COMMAND, "compile", "-y", "-c", str(config)], check=True, capture_output=True)
    return config


def timed(argv: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - began


def floor(modules: list[Path], stapbpf: Path) -> float:
    """Spawn every stapbpf at once and wait until each is ready; then stop them."""
    machine = os.uname().machine
    began = time.perf_counter()
    children = [
        subprocess.Popen(
            [str(stapbpf), str(m)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for m in modules
    ]
    pending = {child.pid for child in children}
    while pending:
        pending = {pid for pid in pending if not is_ready(pid, machine)}
        time.sleep(0.0005)
    elapsed = time.perf_counter() - began
    for child in children:
        child.terminate()
    for child in children:
        child.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stapbpf = build_stapbpf_wrapper(Path(tmp) / "shim")
        print(f"{'scripts':>8} {'shape':<12} {'start s':>9} {'floor s':>9} {'ratio':>6}")
        for count, chained in ((1, False), (args.count, False), (args.count, True)):
            root = Path(tmp) / f"p{count}{'c' if chained else 'i'}"
            config = make_prefix(root, count, chained, stapbpf)
            modules = sorted((root / "cache").glob("*/*.bo"))
            starts, floors = [], []
            for _ in range(args.repeat):
                floors.append(floor(modules, stapbpf))
                starts.append(timed([COMMAND, "start", "-c", str(config)]))
                subprocess.run(
                    [COMMAND, "stop", "-c", str(config)], check=True, capture_output=True
                )
            start, base = statistics.median(starts), statistics.median(floors)
            shape = "chain" if chained else "independent"
            print(f"{count:>8} {shape:<12} {start:>9.3f} {base:>9.3f} {start / base:>6.1f}")


if __name__ == "__main__":
    main()
