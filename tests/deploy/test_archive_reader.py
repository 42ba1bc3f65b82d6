"""Reading an untrusted archive: bounded before allocation, one-line refusals for any bytes."""

from __future__ import annotations

import functools
import gzip
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stapinit.initscript.cache import CacheRecord, KernelIdentity
from stapinit.initscript.packing import (
    MAX_MEMBERS,
    MAX_MODULE_BYTES,
    MAX_SMALL_BYTES,
    Blob,
    PackError,
    check_members,
    make_manifest,
    read_archive,
    read_members,
    write_archive,
)

RELEASE = "6.1.0-56-amd64"
Format = Literal[0, 1, 2]  # tarfile's USTAR, GNU and PAX formats
GIB = 1 << 30


class Counting(io.RawIOBase):
    """A decompressed tar stream that counts what the reader takes from it."""

    def __init__(self, data: bytes) -> None:
        self.data, self.taken = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.taken + size
        chunk = self.data[self.taken : end]
        self.taken += len(chunk)
        return chunk


def header(
    name: str, size: int, kind: bytes = tarfile.REGTYPE, fmt: Format = tarfile.GNU_FORMAT
) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(fmt, "utf-8", "surrogateescape")


def valid_files() -> dict[str, Blob]:
    record = CacheRecord(KernelIdentity(RELEASE, "", "x86_64"), "bpf", ("-v",)).to_text()
    return {
        f"cache/{RELEASE}/tick.bo": Blob.of(b"\x7fELF" + bytes(600)),
        f"cache/{RELEASE}/tick.opts": Blob.of(record.encode()),
        "conf.d/tick.conf": Blob.of(b"tick_OPT='--runtime=bpf -v'\ntick_REQ=''\n"),
    }


@functools.cache
def valid_archive() -> bytes:
    files = valid_files()
    target = io.BytesIO()
    with io.BytesIO() as spool:
        write_archive(target, make_manifest((RELEASE,), files), files, spool)
    return target.getvalue()


@pytest.fixture
def spool() -> Iterator[io.BytesIO]:
    with io.BytesIO() as spooled:
        yield spooled


def test_what_pack_writes_reads_back(tmp_path: Path, spool: io.BytesIO) -> None:
    path = tmp_path / "good.tar.gz"
    path.write_bytes(valid_archive())
    manifest, files = check_members(read_archive(path, spool))
    assert files == {
        name: blob._replace(data=None) if name.endswith(".bo") else blob
        for name, blob in valid_files().items()
    }
    assert manifest.releases == (RELEASE,)
    with tarfile.open(path) as archive:  # plain ustar: any tar reads it
        assert archive.getnames()[0] == "MANIFEST"
        assert {member.type for member in archive} == {tarfile.REGTYPE}


@pytest.mark.parametrize(
    ("stream", "why"),
    [
        (header("././@LongLink", int(1.5 * GIB), tarfile.GNUTYPE_LONGNAME), "GNU long-name header"),
        (header("././@LongLink", GIB, tarfile.GNUTYPE_LONGLINK), "GNU long-link header"),
        (header("././@PaxHeader", GIB, tarfile.XHDTYPE), "pax extended header"),
        (header("pax_global_header", GIB, tarfile.XGLTYPE), "pax global header"),
        (header("x", GIB, tarfile.GNUTYPE_SPARSE), "sparse file"),
        (header("MANIFEST", GIB), "claims 1073741824 bytes; such a file may have 1048576"),
        (header(f"cache/{RELEASE}/tick.bo", MAX_MODULE_BYTES + 1), "such a file may have 67108864"),
        (header("conf.d/tick.conf", MAX_SMALL_BYTES + 1), "such a file may have 65536"),
        (header("conf.d/x.conf", 1 << 62), "such a file may have"),  # a base-256 size
    ],
)
def test_a_header_claiming_too_much_is_refused_before_its_body_is_read(
    stream: bytes, why: str, spool: io.BytesIO
) -> None:
    counting = Counting(stream + bytes(1 << 20))
    with pytest.raises(PackError, match=why):
        read_members(counting, spool)
    # Only the header was read: nothing of the body it announced.
    assert len(stream) == 512 and counting.taken == 512
    assert spool.tell() == 0


def test_too_many_members_are_refused(spool: io.BytesIO) -> None:
    stream = b"".join(header(f"conf.d/m{n}.conf", 0) for n in range(MAX_MEMBERS + 1))
    with pytest.raises(PackError, match=f"more than {MAX_MEMBERS} members"):
        read_members(Counting(stream), spool)


def test_modules_go_to_the_spool_and_small_files_stay_in_memory(spool: io.BytesIO) -> None:
    module = b"\x7fELF" * 1000
    stream = header(f"cache/{RELEASE}/t.bo", len(module)) + module + bytes(-len(module) % 512)
    stream += header("conf.d/t.conf", 3) + b"x=1" + bytes(509) + bytes(1024)
    members = read_members(Counting(stream), spool)
    assert members[f"cache/{RELEASE}/t.bo"] == Blob(Blob.of(module).sha256, len(module), None, 0)
    assert members["conf.d/t.conf"] == Blob.of(b"x=1")
    assert spool.getvalue() == module


def one_line_or_accepted(path: Path, data: bytes) -> None:
    """Reading ``data`` as an archive gives members or a one-line PackError, nothing else."""
    path.write_bytes(data)
    with io.BytesIO() as spooled:
        try:
            check_members(read_archive(path, spooled))
        except PackError as error:
            assert str(error) and "\n" not in str(error)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    one_line_or_accepted(tmp_path_factory.mktemp("fuzz") / "a.tgz", data)


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_gzipped(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    one_line_or_accepted(tmp_path_factory.mktemp("fuzz") / "a.tgz", gzip.compress(data))


@FUZZ
@given(st.data())
def test_mutated_archives(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    tar = bytearray(gzip.decompress(valid_archive()))
    for _ in range(data.draw(st.integers(1, 8))):
        tar[data.draw(st.integers(0, len(tar) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(tar)))
    one_line_or_accepted(tmp_path_factory.mktemp("fuzz") / "a.tgz", gzip.compress(bytes(tar[:cut])))


@FUZZ
@given(st.data())
def test_mutated_compressed_archives(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    archive = bytearray(valid_archive())
    for _ in range(data.draw(st.integers(1, 4))):
        archive[data.draw(st.integers(0, len(archive) - 1))] ^= data.draw(st.integers(1, 255))
    one_line_or_accepted(tmp_path_factory.mktemp("fuzz") / "a.tgz", bytes(archive))


NAMES = st.sampled_from(
    [
        "MANIFEST",
        f"cache/{RELEASE}/tick.bo",
        f"cache/{RELEASE}/tick.opts",
        f"cache/{RELEASE}/tick.bo.sgn",
        "conf.d/tick.conf",
        "../x",
        "/etc/passwd",
        "a" * 300,
        "ü/\udcff",
    ]
)
TYPES = st.sampled_from([bytes([t]) for t in b"01234567LKSxgX"] + [b"\0", b"Z"])


@FUZZ
@given(
    st.lists(
        st.tuples(NAMES, TYPES, st.integers(0, 1 << 40), st.binary(max_size=700)),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
)
def test_crafted_headers(
    tmp_path_factory: pytest.TempPathFactory,
    members: list[tuple[str, bytes, int, bytes]],
    fmt: Format,
) -> None:
    stream = b""
    for name, kind, size, body in members:
        try:
            stream += header(name, size, kind, fmt)
        except ValueError:  # the format cannot hold it
            continue
        stream += body
    one_line_or_accepted(tmp_path_factory.mktemp("fuzz") / "a.tgz", gzip.compress(stream))


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "missing"])
def test_an_archive_path_that_is_no_regular_file_is_refused_without_blocking(
    tmp_path: Path, kind: str, spool: io.BytesIO
) -> None:
    path = tmp_path / "archive.tgz"
    if kind == "fifo":
        import os

        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = Path("/dev/zero")
    with pytest.raises(PackError, match="not a regular file" if kind != "missing" else "no such"):
        read_archive(path, spool)
