#!/usr/bin/env python3
"""Stand-in for ``stap -p4`` that keeps the real command line contract.

The kernel-module runtime cannot be built here (see the project notes), so
tests of the ``.ko`` path use this: it writes ``NAME.ko`` (``NAME.bo`` with
``--runtime=bpf``) in the working directory and prints its name, as stap does.
A script containing ``FAIL_COMPILE`` fails like a semantic error. Every call
is appended to ``$FAKE_CALLS`` as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    calls = os.environ.get("FAKE_CALLS")
    if calls:
        with open(calls, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"tool": "stap", "argv": argv, "cwd": os.getcwd()}) + "\n")
    if "-p4" not in argv or "-m" not in argv or not argv:
        print("fake stap: expected -p4 -m NAME ... FILE", file=sys.stderr)
        return 1
    name = argv[argv.index("-m") + 1]
    source = Path(argv[-1])
    text = source.read_text(encoding="utf-8")
    if "FAIL_COMPILE" in text:
        print(f"semantic error: fake failure in {source}", file=sys.stderr)
        print("Pass 2: analysis failed.  [man error::pass2]", file=sys.stderr)
        return 1
    suffix = ".bo" if "--runtime=bpf" in argv else ".ko"
    module = Path(f"{name}{suffix}")
    module.write_text(json.dumps({"argv": argv, "script": text}), encoding="utf-8")
    print(module.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
