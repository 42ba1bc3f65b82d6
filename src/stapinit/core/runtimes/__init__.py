"""The two runtimes behind :class:`stapinit.core.runtime.Runtime`: BPF and kernel modules."""
