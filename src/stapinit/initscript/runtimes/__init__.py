"""The runtimes that run a compiled script: kernel module (staprun) and BPF (stapbpf)."""

from __future__ import annotations

from stapinit.initscript.runtimes.base import Runtime, RuntimeFailure, Tools
from stapinit.initscript.runtimes.bpf import BpfRuntime
from stapinit.initscript.runtimes.kmod import KernelModuleRuntime


def runtime_for(kind: str, tools: Tools) -> Runtime:
    """The runtime implementation for ``"kmod"`` or ``"bpf"``."""
    if kind == "bpf":
        return BpfRuntime(tools)
    return KernelModuleRuntime(tools)


__all__ = ["Runtime", "RuntimeFailure", "Tools", "runtime_for"]
