"""What a stapbpf module (``NAME.bo``) attaches to, read from its ELF section headers.

``stap --runtime=bpf`` puts each probe's BPF program in its own ELF section and
names the section after what it attaches to: ``stap_begin``/``stap_end``,
``timer/nsec/N``, ``kprobe/...``, ``trace/SYSTEM/NAME``, and for a process probe
``uprobe/p|r/PID/OFFSET/PATH`` (``uprobe/p/0/4400/tmp/elf/victim``).  stapbpf
has no per-user filter for uprobes, so whoever may load a module with one may
probe every user's processes; :func:`user_space_probes` finds them.

stapbpf treats every section whose name starts with ``uprobe`` as a uprobe, so
that is what is matched here (``uretprobe`` too, libbpf's spelling of a return
probe).  Pure, standard library only: the bytes are parsed with ``struct`` and
anything inconsistent raises ValueError with a one-line message.
"""

from __future__ import annotations

import struct
from typing import Final

#: Section-name prefixes of programs that attach to user-space processes.
USER_SPACE_PREFIXES: Final = (b"uprobe", b"uretprobe")

_MAGIC: Final = b"\x7fELF"
_ELFCLASS32: Final = 1
_ELFCLASS64: Final = 2
_ELFDATA2LSB: Final = 1
_ELFDATA2MSB: Final = 2
_SHN_UNDEF: Final = 0
_SHN_LORESERVE: Final = 0xFF00
_SHT_NOBITS: Final = 8

# Per class: the ELF header from e_ident to e_shstrndx, the fields of a section
# header that matter here (sh_name, sh_type, sh_offset, sh_size), and its size.
# The formats omit the byte-order character, added per file.
_EHDR: Final = {_ELFCLASS32: "16sHHIIIIIHHHHHH", _ELFCLASS64: "16sHHIQQQIHHHHHH"}
_SHDR: Final = {_ELFCLASS32: "IIIIII4x4x4x4x", _ELFCLASS64: "IIQQQQ4x4x8x8x"}
_SHDR_SIZE: Final = {_ELFCLASS32: 40, _ELFCLASS64: 64}


def _section_headers(
    module: bytes | bytearray, order: str, elf_class: int, shoff: int, shnum: int, shentsize: int
) -> list[tuple[int, int, int, int]]:
    """(sh_name, sh_type, sh_offset, sh_size) of each section header."""
    if shentsize != _SHDR_SIZE[elf_class]:
        raise ValueError(f"not a BPF module: section header size {shentsize} is wrong")
    if shoff + shnum * shentsize > len(module):
        raise ValueError("not a BPF module: section header table runs past the end of the file")
    fmt = struct.Struct(order + _SHDR[elf_class])
    headers = []
    for index in range(shnum):
        sh_name, sh_type, _flags, _addr, sh_offset, sh_size = fmt.unpack_from(
            module, shoff + index * shentsize
        )
        headers.append((sh_name, sh_type, sh_offset, sh_size))
    return headers


def section_names(module: bytes | bytearray) -> list[str]:
    """Names of all sections of an ELF file, in section-header order (index 0 omitted).

    Names that are not UTF-8 keep their odd bytes as ``\\xNN`` escapes.  Raises
    ValueError (one line) when ``module`` is not a well-formed ELF file.
    """
    return [name.decode("utf-8", "backslashreplace") for name in _raw_section_names(module)]


def _raw_section_names(module: bytes | bytearray) -> list[bytes]:
    if len(module) < 16 or module[:4] != _MAGIC:
        raise ValueError("not a BPF module: no ELF header")
    elf_class, data = module[4], module[5]
    if elf_class not in _EHDR:
        raise ValueError(f"not a BPF module: unknown ELF class {elf_class}")
    if data == _ELFDATA2LSB:
        order = "<"
    elif data == _ELFDATA2MSB:
        order = ">"
    else:
        raise ValueError(f"not a BPF module: unknown ELF byte order {data}")
    ehdr = struct.Struct(order + _EHDR[elf_class])
    if len(module) < ehdr.size:
        raise ValueError("not a BPF module: truncated ELF header")
    fields = ehdr.unpack_from(module)
    shoff, shentsize, shnum, shstrndx = fields[6], fields[11], fields[12], fields[13]
    if shnum == 0:
        if shoff != 0:
            # Extended numbering (count in section 0); stap never writes it.
            raise ValueError("not a BPF module: extended section numbering is not supported")
        return []
    if shstrndx == _SHN_UNDEF or shstrndx >= _SHN_LORESERVE:
        raise ValueError("not a BPF module: no section name table")
    if shstrndx >= shnum:
        raise ValueError(f"not a BPF module: section name table index {shstrndx} out of range")
    headers = _section_headers(module, order, elf_class, shoff, shnum, shentsize)
    _name, str_type, str_offset, str_size = headers[shstrndx]
    if str_type == _SHT_NOBITS or str_offset + str_size > len(module):
        raise ValueError("not a BPF module: section name table lies outside the file")
    strtab = bytes(module[str_offset : str_offset + str_size])
    names = []
    for index, (sh_name, _type, _offset, _size) in enumerate(headers[1:], start=1):
        end = strtab.find(b"\0", sh_name)
        if sh_name >= len(strtab) or end < 0:
            raise ValueError(f"not a BPF module: name of section {index} lies outside its table")
        names.append(strtab[sh_name:end])
    return names


def user_space_probes(module: bytes | bytearray) -> list[str]:
    """Names of the sections of a ``.bo`` whose programs attach to user-space processes.

    These are the ``uprobe...`` and ``uretprobe...`` sections, in file order; a
    module with only kernel, timer and begin/end probes gives ``[]``.  Raises
    ValueError (one line) when ``module`` is not a well-formed ELF file.
    """
    return [
        name.decode("utf-8", "backslashreplace")
        for name in _raw_section_names(module)
        if name.startswith(USER_SPACE_PREFIXES)
    ]
