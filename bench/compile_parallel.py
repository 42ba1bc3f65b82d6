"""Compiling 20 independent real BPF scripts: one by one vs systemtap-service.

The serial figure runs ``stap -p4`` once per script in turn, as upstream's
initscript does; the parallel one is ``systemtap-service compile -y``. Usage:

    .venv/bin/python bench/compile_parallel.py [--count 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from layout import lay_out

COMMAND = str(Path(sys.executable).parent / "systemtap-service")
SCRIPT = 'global n{i}\nprobe timer.ms({ms}) {{ n{i}++; printf("%d\\n", n{i}) }}\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = lay_out(root)
        (root / "serial").mkdir()
        conf = []
        for i in range(args.count):
            (root / "script.d" / f"s{i}.stp").write_text(SCRIPT.format(i=i, ms=100 + i))
            conf.append(f"s{i}_OPT=--runtime=bpf")
        (root / "conf.d" / "all.conf").write_text("\n".join(conf) + "\n")
        began = time.perf_counter()
        for i in range(args.count):
            subprocess.run(
                [
                    "stap",
                    "-p4",
                    "--runtime=bpf",
                    "-m",
                    f"s{i}",
                    str(root / "script.d" / f"s{i}.stp"),
                ],
                cwd=root / "serial",
                capture_output=True,
                check=True,
            )
        serial = time.perf_counter() - began
        began = time.perf_counter()
        subprocess.run(
            [COMMAND, "compile", "-y", "-c", str(config)], capture_output=True, check=True
        )
        parallel = time.perf_counter() - began
    print(f"{args.count} BPF scripts on {os.cpu_count()} CPUs:")
    print(f"  serial stap -p4, one by one:    {serial:6.2f} s")
    print(f"  systemtap-service compile (||): {parallel:6.2f} s  ({serial / parallel:.1f}x)")


if __name__ == "__main__":
    main()
