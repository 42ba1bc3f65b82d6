"""Test-side access to the real SystemTap tools on this machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SHIM_SOURCE = Path(__file__).with_name("memlock_shim.c")


def build_stapbpf_wrapper(workdir: Path) -> Path:
    """Build the memlock shim and a ``stapbpf`` wrapper that preloads it.

    Only tests use this: the VM denies root CAP_SYS_RESOURCE, which real
    stapbpf wants for a limit the kernel no longer needs.
    """
    real = shutil.which("stapbpf")
    if real is None:
        raise RuntimeError("stapbpf is not installed; run dev/setup-host")
    workdir.mkdir(parents=True, exist_ok=True)
    shim = workdir / "memlock_shim.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(SHIM_SOURCE), "-ldl"],
        check=True,
    )
    wrapper = workdir / "stapbpf"
    wrapper.write_text(f'#!/bin/sh\nLD_PRELOAD={shim} exec {real} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper
