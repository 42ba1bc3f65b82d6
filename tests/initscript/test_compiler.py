"""One compile: bounded in time, stoppable, and saying what to install when headers are missing."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from stapinit.initscript.cache import KernelIdentity, running_kernel
from stapinit.initscript.compiler import compile_one, remove_leftovers
from stapinit.initscript.scripts import Script
from tests.support.prefix import process_alive

HANGING_STAP = """#!/bin/sh
echo $$ > "{pidfile}"
exec sleep 600
"""


@pytest.fixture
def script(tmp_path: Path) -> Script:
    source = tmp_path / "hello.stp"
    source.write_text('probe begin { println("hi"); exit() }\n')
    return Script("hello", source, (), (), "bpf")


@pytest.fixture
def hanging_stap(tmp_path: Path) -> tuple[Path, Path]:
    pidfile = tmp_path / "stap.pid"
    stap = tmp_path / "stap"
    stap.write_text(HANGING_STAP.format(pidfile=pidfile))
    stap.chmod(0o755)
    return stap, pidfile


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    cache, temp = tmp_path / "cache", tmp_path / "tmp"
    cache.mkdir()
    temp.mkdir()
    return cache, temp


def test_a_hung_stap_is_stopped_at_compile_timeout(
    script: Script, hanging_stap: tuple[Path, Path], tmp_path: Path
) -> None:
    stap, pidfile = hanging_stap
    cache, temp = dirs(tmp_path)
    began = time.monotonic()
    result = compile_one(str(stap), script, running_kernel(), cache, temp, timeout=1)
    assert time.monotonic() - began < 10
    assert not result.ok
    assert result.summary == "stap did not finish within 1s (COMPILE_TIMEOUT); stopped it"
    assert not process_alive(int(pidfile.read_text()))
    assert list(temp.iterdir()) == [] and list(cache.iterdir()) == []


def test_an_interrupted_compile_stops_stap_promptly(
    script: Script, hanging_stap: tuple[Path, Path], tmp_path: Path
) -> None:
    stap, pidfile = hanging_stap
    cache, temp = dirs(tmp_path)
    signalled = threading.Event()
    threading.Timer(0.5, signalled.set).start()
    began = time.monotonic()
    result = compile_one(
        str(stap), script, running_kernel(), cache, temp, interrupted=signalled.is_set
    )
    assert time.monotonic() - began < 10
    assert (result.ok, result.summary) == (False, "interrupted; stopped stap")
    assert not process_alive(int(pidfile.read_text()))


def test_a_missing_build_tree_says_what_to_install(
    script: Script, real_stap: Path, tmp_path: Path
) -> None:
    release = "0.0.0-stapinit-none"
    assert not os.path.exists(f"/lib/modules/{release}")
    cache, temp = dirs(tmp_path)
    kernel = KernelIdentity(release, "", os.uname().machine)
    result = compile_one(str(real_stap), script, kernel, cache, temp)
    assert not result.ok
    assert result.summary == (
        f"no kernel headers for {release}: stap needs /lib/modules/{release}/build; "
        f"install them (Debian: apt-get install linux-headers-{release})"
    )
    assert f'Checking "/lib/modules/{release}/build/.config" failed' in result.output


def test_messages_name_the_script_not_the_private_copy(
    script: Script, real_stap: Path, tmp_path: Path
) -> None:
    assert script.source is not None
    script.source.write_text("probe begin { x = }\n")
    cache, temp = dirs(tmp_path)
    result = compile_one(str(real_stap), script, running_kernel(), cache, temp)
    assert not result.ok
    assert str(script.source) in result.output and str(temp) not in result.output
    assert result.argv[-1] == str(script.source)


def test_leftovers_of_killed_compiles_go_but_busy_and_foreign_ones_stay(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    abandoned = temp / "stap-alpha-x1y2z3"  # what a compile killed with SIGKILL leaves
    (abandoned / "deep").mkdir(parents=True)
    (abandoned / "deep" / "alpha.ko").write_bytes(b"half")
    outside = tmp_path / "precious"
    outside.write_text("keep")
    (abandoned / "link").symlink_to(outside)
    busy = temp / "stap-beta-a1b2c3"  # a compile that still runs holds its lock
    busy.mkdir()
    held = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    other = temp / "stap-notes"  # not a work directory of ours
    other.mkdir()
    planted = temp / "stap-gamma-q9w8e7"  # a link named like one
    planted.symlink_to(outside)
    try:
        assert remove_leftovers(temp) == [abandoned]
    finally:
        os.close(held)
    assert busy.is_dir() and other.is_dir() and planted.is_symlink()
    assert outside.read_text() == "keep"
    assert remove_leftovers(temp) == [busy]  # released: now it is a leftover too
