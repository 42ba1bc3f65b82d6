from __future__ import annotations

import os
from pathlib import Path

import pytest

from stapinit.initscript import cache
from stapinit.initscript.cache import CacheRecord, CacheState, KernelIdentity, staleness

KERNEL = KernelIdentity("6.1.0-56-amd64", "#1 SMP Debian 6.1.192-2", "x86_64")
DIGEST = "a" * 64
WANTED = CacheRecord(KERNEL, "bpf", ("-DX=1",), DIGEST)


def state(record: CacheRecord | None = WANTED, module_mtime: float | None = 100.0) -> CacheState:
    return CacheState(module_mtime, record, record is not None)


def test_valid_cache() -> None:
    assert staleness(state(), WANTED) is None


def test_missing_module_or_record() -> None:
    assert staleness(state(module_mtime=None), WANTED) == "no compiled module"
    assert staleness(state(record=None), WANTED) == "no .opts record"


def test_script_text_decides_not_its_time_stamp() -> None:
    changed = WANTED._replace(source="b" * 64)
    assert staleness(state(), changed) == "script changed"
    # A script touched (or restored with an old time stamp) is judged by its text.
    assert staleness(state(), WANTED) is None
    # A record from before digests, or of another text, never vouches for the script.
    assert staleness(state(record=WANTED._replace(source="")), WANTED) == "script changed"


def test_cache_only_script_is_judged_by_its_record_alone() -> None:
    assert staleness(state(), WANTED._replace(source="")) is None


def test_run_time_options_are_not_part_of_the_record() -> None:
    from stapinit.initscript.options import parse_options, recorded_options, split_options

    before = recorded_options(parse_options(split_options("-DX=1 -S 1,2 -o /l/a -F -s 4 -v")))
    after = recorded_options(parse_options(split_options("-DX=1 -S 9,9 -o /l/b -s 8 -c ls -x 1")))
    assert before == after == ["-D", "X=1"]
    assert staleness(state(), WANTED._replace(options=tuple(after))) == "options changed"
    assert (
        staleness(
            state(record=WANTED._replace(options=tuple(after))),
            WANTED._replace(options=tuple(before)),
        )
        is None
    )


def test_only_regular_files_count_and_nothing_blocks(tmp_path: Path) -> None:
    directory = tmp_path / "rel"
    directory.mkdir()
    (directory / "s.opts").symlink_to("/dev/zero")  # once a MemoryError
    (directory / "s.bo").symlink_to(tmp_path / "elsewhere.bo")
    (tmp_path / "elsewhere.bo").write_bytes(b"x")
    found = cache.inspect(directory, "s", ".bo")
    assert found == CacheState(None, None, True)
    assert staleness(found, WANTED) == "no compiled module"
    (directory / "s.opts").unlink()
    os.mkfifo(directory / "s.opts")  # once a hang
    (directory / "s.bo").unlink()
    (directory / "s.bo").write_bytes(b"x")
    found = cache.inspect(directory, "s", ".bo")
    assert found.record_present and found.record is None
    assert staleness(found, WANTED) == "unreadable .opts record"


def test_options_changed() -> None:
    wanted = CacheRecord(KERNEL, "bpf", ("-DX=2",))
    assert staleness(state(), wanted) == "options changed"


@pytest.mark.parametrize(
    "kernel",
    [
        KernelIdentity("6.1.0-57-amd64", KERNEL.version, "x86_64"),
        KernelIdentity(KERNEL.release, "#2 SMP Debian 6.1.193-1", "x86_64"),
        KernelIdentity(KERNEL.release, KERNEL.version, "aarch64"),
    ],
)
def test_kernel_changed(kernel: KernelIdentity) -> None:
    assert staleness(state(), CacheRecord(kernel, "bpf", ("-DX=1",))) == "kernel changed"


def test_host_name_is_not_part_of_the_identity() -> None:
    # The record has no host name at all: a cache built on another machine with
    # the same kernel is valid here (spec §5.8).
    assert "node" not in WANTED.to_text() and "host" not in WANTED.to_text()
    assert CacheRecord.from_text(WANTED.to_text()) == WANTED


def test_compiled_for_other_release_matches_once_that_kernel_runs() -> None:
    ahead = WANTED._replace(kernel=KernelIdentity(KERNEL.release, "", "x86_64"))
    assert staleness(state(record=ahead), WANTED) is None


def test_record_round_trip_keeps_quoted_options() -> None:
    record = CacheRecord(KERNEL, "kmod", ("-D", "A=b c", "-I", "/t"))
    assert CacheRecord.from_text(record.to_text()) == record
    assert CacheRecord.from_text("garbage") is None


def test_install_replaces_record_last(tmp_path: Path) -> None:
    built = tmp_path / "build" / "s.bo"
    built.parent.mkdir()
    built.write_bytes(b"module")
    target = tmp_path / "cache" / KERNEL.release
    cache.install(target, "s", ".bo", built, WANTED)
    assert (target / "s.bo").read_bytes() == b"module"
    assert CacheRecord.from_text((target / "s.opts").read_text()) == WANTED
    assert sorted(p.name for p in target.iterdir()) == ["s.bo", "s.opts"]
    assert cache.remove(target, "s") == [target / "s.bo", target / "s.opts"]


def test_interrupted_install_leaves_no_record_vouching_for_a_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "cache"
    built = tmp_path / "s.bo"
    built.write_bytes(b"old")
    cache.install(target, "s", ".bo", built, WANTED)
    built.write_bytes(b"new")

    def crash(source: Path, path: Path, mode: int = 0o644) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "atomic_copy", crash)
    with pytest.raises(OSError):
        cache.install(target, "s", ".bo", built, WANTED)
    # The old module may stay, but no record says it is valid: a start recompiles.
    assert staleness(cache.inspect(target, "s", ".bo"), WANTED) == "no .opts record"


def test_switching_runtime_removes_the_other_module(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    built = tmp_path / "s.ko"
    built.write_bytes(b"kmod")
    cache.install(target, "s", ".ko", built, CacheRecord(KERNEL, "kmod", ()))
    bo = tmp_path / "s.bo"
    bo.write_bytes(b"bpf")
    cache.install(target, "s", ".bo", bo, WANTED)
    assert sorted(p.name for p in target.iterdir()) == ["s.bo", "s.opts"]


def test_removing_a_cache_leaves_directories_and_link_targets_alone(tmp_path: Path) -> None:
    directory = tmp_path / "rel"
    directory.mkdir()
    (directory / "s.ko").mkdir()  # not ours
    target = tmp_path / "precious"
    target.write_text("keep")
    (directory / "s.bo").symlink_to(target)
    (directory / "s.opts").write_text("x")
    assert cache.cached_files(directory, "s") == [directory / "s.bo", directory / "s.opts"]
    assert cache.remove(directory, "s") == [directory / "s.bo", directory / "s.opts"]
    assert (directory / "s.ko").is_dir() and target.read_text() == "keep"
