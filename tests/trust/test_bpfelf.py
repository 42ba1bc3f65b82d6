"""Reading a stapbpf module's section headers: which programs attach to user space."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stapinit.trust.bpfelf import section_names, user_space_probes
from tests.trust.bpfmodules import (
    HELLO_SCRIPT,
    build_victim,
    compile_bo,
    process_probe_script,
)

# --- a minimal ELF writer, so every class and byte order can be checked --------------


def make_elf(names: list[str], *, bits: int = 64, order: str = "<") -> bytes:
    """An ELF relocatable file with one empty PROGBITS section per name, plus .shstrtab.

    Layout: header, string table, section headers (so offsets are easy to break).
    """
    strtab = b"\0"
    name_offsets = []
    for name in [*names, ".shstrtab"]:
        name_offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    ehsize, shentsize = (64, 64) if bits == 64 else (52, 40)
    strtab_offset = ehsize
    shoff = strtab_offset + len(strtab)
    shnum = len(names) + 2  # the null section, the named ones, .shstrtab
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1 if order == "<" else 2, 1]) + bytes(9)
    if bits == 64:
        header = struct.pack(
            order + "16sHHIQQQIHHHHHH", ident, 1, 0xF7, 1, 0, 0, shoff, 0, ehsize, 0, 0,
            shentsize, shnum, shnum - 1,
        )  # fmt: skip
        shdr = struct.Struct(order + "IIQQQQIIQQ")
    else:
        header = struct.pack(
            order + "16sHHIIIIIHHHHHH", ident, 1, 0xF7, 1, 0, 0, shoff, 0, ehsize, 0, 0,
            shentsize, shnum, shnum - 1,
        )  # fmt: skip
        shdr = struct.Struct(order + "IIIIIIIIII")
    sections = [shdr.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    for offset in name_offsets[:-1]:
        sections.append(shdr.pack(offset, 1, 6, 0, strtab_offset, 0, 0, 0, 8, 0))
    sections.append(shdr.pack(name_offsets[-1], 3, 0, 0, strtab_offset, len(strtab), 0, 0, 1, 0))
    return header + strtab + b"".join(sections)


KINDS = ["stap_begin", "timer/nsec/1000000", "uprobe/p/0/4400/tmp/elf/victim", "stap_end"]


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("order", ["<", ">"])
def test_every_class_and_byte_order_is_read(bits: int, order: str) -> None:
    module = make_elf(KINDS, bits=bits, order=order)
    assert section_names(module) == [*KINDS, ".shstrtab"]
    assert user_space_probes(module) == ["uprobe/p/0/4400/tmp/elf/victim"]


def test_return_probes_and_anything_stapbpf_takes_for_a_uprobe_count() -> None:
    # stapbpf treats every section whose name starts with "uprobe" as one.
    names = ["uprobe/r/0/10/bin/x", "uretprobe/bin/y", "uprobes", "kprobe/uprobe", "xuprobe/"]
    assert user_space_probes(make_elf(names)) == names[:3]


def test_a_module_without_user_space_probes_gives_nothing() -> None:
    assert user_space_probes(make_elf(["stap_begin", "kprobe/vfs_read", "trace/a/b"])) == []


# --- malformed input: one ValueError, one line -------------------------------------

GOOD = make_elf(KINDS)
_SHOFF = 0x28  # e_shoff in a 64-bit header
_SHSTRNDX = 0x3E


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (b"", "no ELF header"),
        (b"MZ" + GOOD[2:], "no ELF header"),
        (GOOD[:20], "truncated ELF header"),
        (GOOD[:4] + b"\x03" + GOOD[5:], "unknown ELF class 3"),
        (GOOD[:5] + b"\x00" + GOOD[6:], "unknown ELF byte order 0"),
        (GOOD[:-1], "section header table runs past the end of the file"),
        (_patch(GOOD, _SHOFF, "<Q", 2**63), "section header table runs past the end"),
        (_patch(GOOD, _SHSTRNDX, "<H", 0), "no section name table"),
        (_patch(GOOD, _SHSTRNDX, "<H", 40), "section name table index 40 out of range"),
        (_patch(GOOD, 0x3A, "<H", 32), "section header size 32 is wrong"),
        (_patch(GOOD, 0x3C, "<H", 0), "extended section numbering is not supported"),
    ],
)
def test_malformed_modules_raise_one_line_value_errors(module: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        user_space_probes(module)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("not a BPF module: ")


def test_a_name_outside_the_string_table_is_refused() -> None:
    shoff = struct.unpack_from("<Q", GOOD, _SHOFF)[0]
    broken = _patch(GOOD, shoff + 64, "<I", 10_000)  # sh_name of section 1
    with pytest.raises(ValueError, match="name of section 1 lies outside its table"):
        user_space_probes(broken)


def test_a_string_table_past_the_end_of_the_file_is_refused() -> None:
    shoff = struct.unpack_from("<Q", GOOD, _SHOFF)[0]
    last = shoff + 64 * (len(KINDS) + 1)
    broken = _patch(GOOD, last + 32, "<Q", 10_000)  # sh_size of .shstrtab
    with pytest.raises(ValueError, match="section name table lies outside the file"):
        user_space_probes(broken)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_nothing_but_value_error(data: bytes) -> None:
    try:
        result = user_space_probes(data)
    except ValueError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(isinstance(name, str) for name in result)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_corrupted_real_headers_raise_nothing_but_value_error(data: st.DataObject) -> None:
    # Random bytes rarely get past the magic; flipping bytes of a valid file does.
    module = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 6))):
        index = data.draw(st.integers(0, len(module) - 1))
        module[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(module)))
    try:
        user_space_probes(bytes(module[:cut]))
    except ValueError as exc:
        assert "\n" not in str(exc)


# --- real modules from stap -------------------------------------------------------


@pytest.fixture(scope="module")
def real_modules(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    base = tmp_path_factory.mktemp("bpfelf")
    victim = build_victim(base)
    probe = compile_bo(base, "uprobe_mod", process_probe_script(victim))
    hello = compile_bo(base, "hello_mod", HELLO_SCRIPT)
    return victim, probe, hello


def test_a_real_process_probe_is_found(real_modules: tuple[Path, bytes, bytes]) -> None:
    victim, probe, _hello = real_modules
    found = user_space_probes(probe)
    assert len(found) == 1
    assert found[0].startswith("uprobe/p/0/")
    assert found[0].endswith(str(victim))
    assert "stap_begin" in section_names(probe)


def test_a_real_hello_world_has_no_user_space_probes(
    real_modules: tuple[Path, bytes, bytes],
) -> None:
    _victim, _probe, hello = real_modules
    assert user_space_probes(hello) == []
    assert "stap_begin" in section_names(hello)
