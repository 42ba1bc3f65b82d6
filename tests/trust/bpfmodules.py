"""Real stapbpf modules for tests: a tiny victim program and ``stap -p4`` output.

Used by the ELF reader's tests and by the loader's, which must refuse a signed
``.bo`` that probes user space when the caller is below stapdev.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

VICTIM_SOURCE = """\
#include <stdio.h>
int work(int x) { return x * 2; }
int main(void) {
    int s = 0;
    for (int i = 0; i < 3; i++) s += work(i);
    printf("%d\\n", s);
    return 0;
}
"""

HELLO_SCRIPT = 'probe begin { println("hello"); exit() }'


def build_victim(directory: Path) -> Path:
    """Compile a small program with a function ``work`` (``gcc -g -O0``)."""
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "victim.c"
    source.write_text(VICTIM_SOURCE)
    binary = directory / "victim"
    subprocess.run(["gcc", "-g", "-O0", "-o", str(binary), str(source)], check=True)
    return binary


def process_probe_script(victim: Path) -> str:
    """A stapusr-safe script with a begin probe and a user-space (uprobe) probe."""
    return (
        f'probe process("{victim}").function("work") {{ printf("work\\n") }} '
        'probe begin { println("begin"); exit() }'
    )


def compile_bo(directory: Path, name: str, script: str) -> bytes:
    """``stap --runtime=bpf --privilege=stapusr -p4 -m NAME -e SCRIPT``; the ``.bo``'s bytes."""
    stap = shutil.which("stap")
    if stap is None:
        raise RuntimeError("stap is not installed; run dev/setup-host")
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [stap, "--runtime=bpf", "--privilege=stapusr", "-p4", "-m", name, "-e", script],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )
    module = directory / f"{name}.bo"
    if result.returncode != 0 or not module.exists():
        raise RuntimeError(f"stap -p4 failed: {result.stderr.strip()}")
    return module.read_bytes()
