from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.prefix import RELEASE, Prefix

TICK = (
    "global n\n"
    'probe timer.ms(50) { n++; printf("tick %d\\n", n) }\n'
    'probe end { printf("end\\n") }\n'
)


@dataclass
class Hosts:
    """A build host that compiles, and a target with no compiler and no .stp files."""

    build: Prefix
    target: Prefix
    root: Path


@pytest.fixture
def hosts(tmp_path: Path, stapbpf_wrapper: Path) -> Iterator[Hosts]:
    """Two separate prefixes; the target's STAP does not exist, as on a production host."""
    build = Prefix(tmp_path / "build", {"STAPBPF": str(stapbpf_wrapper)})
    target = Prefix(
        tmp_path / "target",
        {
            "STAPBPF": str(stapbpf_wrapper),
            "STAP": str(tmp_path / "no-compiler" / "stap"),
            "AUTOCOMPILE": "no",
            "ALLOW_CACHEONLY": "yes",
        },
    )
    yield Hosts(build, target, tmp_path)
    target.kill_leftovers()
    build.kill_leftovers()


Entry = tuple[tarfile.TarInfo, bytes]


def regular(name: str, data: bytes) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, b""


def manifest(files: dict[str, bytes], release: str = RELEASE) -> Entry:
    """The MANIFEST format, written independently of the product's code."""
    text = f"systemtap-service pack 1\nrelease {release}\n"
    text += "".join(
        f"sha256 {hashlib.sha256(data).hexdigest()} {path}\n" for path, data in files.items()
    )
    return regular("MANIFEST", text.encode())


def write_tar(path: Path, entries: list[Entry]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    with tarfile.open(path) as check:  # the hostile names survive as written
        assert check.getnames() == [info.name for info, _ in entries]


@pytest.fixture(scope="session")
def packed_once(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files (MANIFEST aside) of a real pack of one script, compiled once."""
    root = tmp_path_factory.mktemp("packed")
    build = Prefix(root / "build")
    build.add_script("tick", TICK, options="--runtime=bpf")
    assert build.run("compile", "-y").returncode == 0
    archive = root / "good.tar.gz"
    done = build.run("pack", "-o", str(archive))
    assert done.returncode == 0, done.stderr
    with tarfile.open(archive) as members:
        files = {}
        for info in members.getmembers():
            handle = members.extractfile(info)
            assert handle is not None
            files[info.name] = handle.read()
    assert files.pop("MANIFEST").startswith(b"systemtap-service pack 1\n")
    return files


@pytest.fixture
def packed(packed_once: dict[str, bytes]) -> dict[str, bytes]:
    """The files of a real pack of one script (a copy each test may change)."""
    return dict(packed_once)


def listed(files: dict[str, bytes]) -> list[Entry]:
    """A manifest listing ``files``, then the files, all regular."""
    return [manifest(files)] + [regular(path, data) for path, data in files.items()]
