"""The pure rules behind pack and unpack, and finding kernels with a build tree."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapinit.initscript.cache import CacheRecord, KernelIdentity
from stapinit.initscript.kernels import releases_with_build_tree
from stapinit.initscript.packing import (
    ArchiveManifest,
    Blob,
    Entry,
    PackError,
    check_members,
    classify,
    make_manifest,
    parse_manifest,
    plan,
)

RELEASE = "6.1.0-56-amd64"


def record(release: str = RELEASE, runtime: str = "bpf") -> bytes:
    kernel = KernelIdentity(release, "", "x86_64")
    return CacheRecord(kernel, runtime, ("-DX=1",)).to_text().encode()


def blobs(files: dict[str, bytes]) -> dict[str, Blob]:
    return {path: Blob.of(data) for path, data in files.items()}


def members(files: dict[str, bytes], releases: tuple[str, ...] = (RELEASE,)) -> dict[str, Blob]:
    manifest = make_manifest(releases, blobs(files)).to_text().encode()
    return {"MANIFEST": Blob.of(manifest), **blobs(files)}


GOOD = {
    f"cache/{RELEASE}/a.bo": b"\x7fELF a",
    f"cache/{RELEASE}/a.opts": record(),
    f"cache/{RELEASE}/b.ko": b"\x7fELF b",
    f"cache/{RELEASE}/b.opts": record(runtime="kmod"),
    "conf.d/a.conf": b"a_OPT=--runtime=bpf\n",
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"cache/{RELEASE}/tick.bo", Entry("module", RELEASE, "tick.bo", "tick")),
        (f"cache/{RELEASE}/tick.ko", Entry("module", RELEASE, "tick.ko", "tick")),
        (f"cache/{RELEASE}/tick_2.opts", Entry("record", RELEASE, "tick_2.opts", "tick_2")),
        (f"cache/{RELEASE}/t.ko.sgn", Entry("signature", RELEASE, "t.ko.sgn", "t")),
        ("conf.d/tick_2.conf", Entry("conf", "", "tick_2.conf", "tick_2")),
    ],
)
def test_classify_accepts_only_cache_and_conf_files(path: str, expected: Entry) -> None:
    assert classify(path, (RELEASE,)) == expected


@pytest.mark.parametrize(
    "path",
    [
        "MANIFEST",
        f"cache/{RELEASE}/tick.stp",
        f"cache/{RELEASE}/tick",
        f"cache/{RELEASE}/.bo",
        f"cache/{RELEASE}/9tick.bo",
        f"cache/{RELEASE}/sub/tick.bo",
        "cache/other/tick.bo",
        "conf.d/group1",
        "conf.d/group-1.conf",
        "conf.d/a.b.conf",
        f"cache/{RELEASE}/tick.opts.sgn",
        f"cache/{RELEASE}/tick.sgn",
        f"cache/{RELEASE}/{'x' * 65}.bo",
        "conf.d/.hidden.conf",
        "conf.d/../x.conf",
        "/etc/systemtap/conf.d/x.conf",
        f"./cache/{RELEASE}/tick.bo",
        f"cache//{RELEASE}/tick.bo",
    ],
)
def test_classify_refuses_everything_else(path: str) -> None:
    with pytest.raises(PackError):
        classify(path, (RELEASE,))


PIECES = st.sampled_from(["..", ".", "", "cache", RELEASE, "conf.d", "a.bo", "x.conf", "etc"])


@given(st.lists(PIECES, min_size=1, max_size=5))
def test_no_accepted_path_can_leave_its_directory(parts: list[str]) -> None:
    path = "/".join(parts)
    try:
        entry = classify(path, (RELEASE,))
    except PackError:
        return
    assert not path.startswith("/")
    assert ".." not in parts and "." not in parts and "" not in parts
    assert "/" not in entry.filename and entry.filename not in (".", "..")
    assert entry.area in ("module", "record", "signature", "conf")


def test_manifest_round_trips_and_lists_sha256() -> None:
    manifest = make_manifest((RELEASE, "5.10.0-9"), blobs(GOOD))
    assert parse_manifest(manifest.to_text()) == manifest
    assert manifest.to_text().splitlines()[:3] == [
        "systemtap-service pack 1",
        f"release {RELEASE}",
        "release 5.10.0-9",
    ]
    line = f"sha256 {'0' * 64} conf.d/group1.conf"
    assert parse_manifest(
        f"systemtap-service pack 1\nrelease {RELEASE}\n{line}\n"
    ) == ArchiveManifest((RELEASE,), {"conf.d/group1.conf": "0" * 64})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "something else\n",
        "systemtap-service pack 1\n",
        "systemtap-service pack 1\nrelease ../x\n",
        f"systemtap-service pack 1\nrelease {RELEASE}\nsha256 abc conf.d/a.conf\n",
        f"systemtap-service pack 1\nrelease {RELEASE}\nmd5 {'0' * 64} conf.d/a.conf\n",
        f"systemtap-service pack 1\nrelease {RELEASE}\nsha256 {'0' * 64} ../a.conf\n",
        f"systemtap-service pack 1\nrelease {RELEASE}\n"
        f"sha256 {'0' * 64} conf.d/a.conf\nsha256 {'1' * 64} conf.d/a.conf\n",
        f"systemtap-service pack 1\nrelease {RELEASE}\nrelease {RELEASE}\n",
        f"systemtap-service pack 1\nrelease {RELEASE}\nsha256 {'0' * 64} cache/9.9/a.bo\n",
        "systemtap-service pack 1\n" + "".join(f"release 1.{n}\n" for n in range(65)),
    ],
)
def test_bad_manifests_are_refused(text: str) -> None:
    with pytest.raises(PackError):
        parse_manifest(text)


def test_check_members_accepts_a_complete_archive() -> None:
    manifest, files = check_members(members(GOOD))
    assert manifest.releases == (RELEASE,) and files == blobs(GOOD)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({f"cache/{RELEASE}/a.opts": record(release="5.10.0")}, "is for 5.10.0"),
        ({f"cache/{RELEASE}/a.opts": b"not a record"}, "is not a cache record"),
        ({f"cache/{RELEASE}/a.opts": record(runtime="kmod")}, "records runtime kmod"),
        ({f"cache/{RELEASE}/a.ko": b"\x7fELF"}, "both a .ko and a .bo"),
        ({f"cache/{RELEASE}/c.opts": record()}, "c.opts comes without a module"),
        ({f"cache/{RELEASE}/b.bo.sgn": b"{}"}, "signs cache/.*/b.bo, which the archive lacks"),
        ({"conf.d/c.conf": b"c_OPT=-v\n"}, "configures c, which the archive does not carry"),
        ({"conf.d/a.conf": b"b_OPT=-v\n"}, "conf.d/a.conf:1: b_OPT is not a_OPT or a_REQ"),
    ],
)
def test_check_members_refuses_inconsistent_caches(change: dict[str, bytes], message: str) -> None:
    with pytest.raises(PackError, match=message):
        check_members(members({**GOOD, **change}))


def test_plan_puts_conf_first_and_each_record_after_its_module(tmp_path: Path) -> None:
    signed = {**GOOD, f"cache/{RELEASE}/b.ko.sgn": b"{}"}
    _, files = check_members(members(signed))
    cache, conf = tmp_path / "cache", tmp_path / "conf.d"
    placements = plan(files, (RELEASE,), cache, conf)
    release_dir = cache / RELEASE
    assert [p.destination for p in placements] == [
        conf / "a.conf",
        release_dir / "a.bo",
        release_dir / "a.opts",
        release_dir / "b.ko",
        release_dir / "b.ko.sgn",
        release_dir / "b.opts",
    ]
    by_name = {p.destination.name: p for p in placements}
    # The old record goes before a module lands, and so do a module of the
    # other runtime and old signatures.
    assert by_name["a.bo"].removes_first == (
        release_dir / "a.opts",
        release_dir / "a.ko",
        release_dir / "a.ko.sgn",
        release_dir / "a.bo.sgn",
    )
    assert by_name["b.ko"].removes_first[:2] == (release_dir / "b.opts", release_dir / "b.bo")
    assert by_name["a.opts"].removes_first == ()
    assert by_name["a.bo"].path == f"cache/{RELEASE}/a.bo"


def test_releases_with_build_tree(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    headers = tmp_path / "headers"
    headers.mkdir()
    (headers / ".config").write_text("CONFIG_BPF=y\n")
    for release in ("6.2.0-1", "5.10.0-9"):
        (modules / release).mkdir(parents=True)
        (modules / release / "build").symlink_to(headers)
    (modules / "4.19.0-no-build").mkdir()
    (modules / "4.9.0-no-config" / "build").mkdir(parents=True)
    (modules / "4.4.0-dangling").mkdir()
    (modules / "4.4.0-dangling" / "build").symlink_to(tmp_path / "gone")
    (modules / "not-a-directory").write_text("")
    assert releases_with_build_tree(modules) == ["5.10.0-9", "6.2.0-1"]
    assert releases_with_build_tree(tmp_path / "missing") == []
