#!/usr/bin/env python3
"""Stand-in for ``staprun`` (4.8's contract, ``staprun -h``) with a fake module list.

``-L`` "loads" the module: its name is added to ``$FAKE_MODULES`` (the file the
service reads as ``MODULES_LIST``). ``-D -o FILE`` starts a daemon that writes
to FILE until SIGTERM, then unloads; its pid is printed. ``-d NAME`` unloads.
Every call is appended to ``$FAKE_CALLS`` as one JSON line.
"""

from __future__ import annotations

import fcntl
import getopt
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType


def _edit_modules(name: str, add: bool) -> None:
    path = Path(os.environ["FAKE_MODULES"])
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        lines = [line for line in handle.read().splitlines() if line.split()[0] != name]
        if add:
            lines.append(f"{name} 16384 0 - Live 0x0000000000000000 (OE)")
        handle.seek(0)
        handle.truncate()
        handle.write("".join(f"{line}\n" for line in lines))


def _loaded(name: str) -> bool:
    path = Path(os.environ["FAKE_MODULES"])
    return path.exists() and any(
        line.split()[0] == name for line in path.read_text().splitlines() if line.strip()
    )


def _daemon(name: str, output: str) -> int:
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        pid = os.read(read_end, 32).decode()
        print(pid)
        return 0
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.write(write_end, str(os.getpid()).encode())
    os.close(write_end)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    def stop(signum: int, frame: FrameType | None) -> None:
        _edit_modules(name, add=False)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    ticks = 0
    while True:
        ticks += 1
        with open(output, "a", encoding="utf-8") as handle:
            handle.write(f"tick {ticks}\n")
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    calls = os.environ.get("FAKE_CALLS")
    if calls:
        with open(calls, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"tool": "staprun", "argv": argv}) + "\n")
    try:
        opts, args = getopt.getopt(argv, "vwuc:x:ALdb:RDo:S:")
    except getopt.GetoptError as error:
        print(f"staprun: {error}", file=sys.stderr)
        return 1
    flags = dict(opts)
    if len(args) != 1:
        print("staprun: need exactly one MODULE", file=sys.stderr)
        return 1
    target = args[0]
    if "-b" in flags and not (flags["-b"].isdigit() and 1 <= int(flags["-b"]) <= 4095):
        print("staprun: Invalid buffer size (should be 1-4095).", file=sys.stderr)
        return 1
    if "-d" in flags:
        if not _loaded(target):
            print(f"ERROR: module {target} is not loaded", file=sys.stderr)
            return 1
        _edit_modules(target, add=False)
        return 0
    name = Path(target).name.removesuffix(".ko")
    if not Path(target).is_file():
        print(f"ERROR: Couldn't open file '{target}'", file=sys.stderr)
        return 1
    if _loaded(name):
        print(f"ERROR: module {name} is already loaded", file=sys.stderr)
        return 1
    if "-D" in flags:
        if "-o" not in flags:
            print("staprun: -D option requires -o", file=sys.stderr)
            return 1
        _edit_modules(name, add=True)
        return _daemon(name, flags["-o"])
    if "-L" in flags:
        _edit_modules(name, add=True)
        print(name)
        return 0
    print("fake staprun: only -L, -D and -d are supported", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
