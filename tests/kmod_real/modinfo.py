"""What ``modinfo`` shows of a kernel module, read from its ELF ``.modinfo`` section.

The section holds NUL-separated ``key=value`` strings (``vermagic=6.12.48+deb13-amd64
SMP preempt mod_unload modversions``, ``name=hello``, ``license=GPL``...), as the
kernel's modpost writes them and ``modinfo -F KEY`` prints them.
"""

from __future__ import annotations

import struct

ELF_MAGIC = b"\x7fELF"
ET_REL = 1  # e_type of a relocatable object: what a .ko is


def _sections(data: bytes) -> dict[str, bytes]:
    """Section name to contents, for a 64-bit ELF file of either byte order."""
    if data[:4] != ELF_MAGIC or data[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    order = "<" if data[5] == 1 else ">"
    shoff = struct.unpack_from(order + "Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", data, 0x3A)

    def header(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name = struct.unpack_from(order + "I", data, base)[0]
        offset, size = struct.unpack_from(order + "QQ", data, base + 0x18)
        return name, offset, size

    _, names_offset, names_size = header(shstrndx)
    names = data[names_offset : names_offset + names_size]
    sections = {}
    for index in range(shnum):
        name, offset, size = header(index)
        label = names[name : names.index(b"\0", name)].decode()
        sections[label] = data[offset : offset + size]
    return sections


def elf_type(data: bytes) -> int:
    """``e_type`` of an ELF file (1 for a relocatable object such as a module)."""
    order = "<" if data[5] == 1 else ">"
    value: int = struct.unpack_from(order + "H", data, 0x10)[0]
    return value


def modinfo(data: bytes) -> dict[str, str]:
    """The module's ``.modinfo`` entries (the first value of a repeated key)."""
    entries: dict[str, str] = {}
    for item in _sections(data)[".modinfo"].split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            entries.setdefault(key, value)
    return entries
