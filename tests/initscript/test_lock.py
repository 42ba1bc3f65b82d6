"""The lock file under STAT_PATH is opened as itself, never through a link planted there."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from stapinit.initscript.lock import CommandLock, LockError
from tests.initscript.conftest import FakeTools
from tests.support.prefix import Prefix


def test_the_lock_records_its_holder_and_is_emptied_after(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with CommandLock(tmp_path, 1, "stop"):
        assert lock.read_text() == f"pid {os.getpid()}: stop\n"
    assert lock.read_text() == ""


def test_a_symlinked_lock_is_refused_and_its_target_untouched(
    kmod_prefix: Prefix, fake_tools: FakeTools, tmp_path: Path
) -> None:
    kmod_prefix.add_script("mine", "probe begin { }\n")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lock = kmod_prefix.stat / ".lock"
    lock.symlink_to(victim)
    for command in ("start", "stop"):
        done = kmod_prefix.run(command)
        assert (done.returncode, done.stdout, done.stderr) == (
            1,
            "",
            f"systemtap-service: refusing lock file {lock}: it is a symbolic link\n",
        )
    assert victim.read_text() == "precious\n"
    assert lock.is_symlink()
    assert fake_tools.loaded() == [] and fake_tools.calls_of("stap") == []


def test_a_dangling_symlink_is_not_followed_to_create_a_file(tmp_path: Path) -> None:
    target = tmp_path / "created-elsewhere"
    (tmp_path / ".lock").symlink_to(target)
    with pytest.raises(LockError, match=r"it is a symbolic link$"), CommandLock(tmp_path, 1, "x"):
        pass
    assert not target.exists()


def test_a_lock_that_is_no_regular_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / ".lock")
    not_regular = r"\.lock: it is not a regular file$"
    with pytest.raises(LockError, match=not_regular), CommandLock(tmp_path, 1, "x"):
        pass
    (tmp_path / ".lock").unlink()
    (tmp_path / ".lock").mkdir()
    directory = r"cannot open lock file .*\.lock: Is a directory$"
    with pytest.raises(LockError, match=directory), CommandLock(tmp_path, 1, "x"):
        pass


def test_other_users_cannot_open_the_lock_to_hold_it(kmod_prefix: Prefix) -> None:
    """flock needs only read access: a lock file others can open is a lock they can hold."""
    assert kmod_prefix.run("start").returncode == 0
    lock = kmod_prefix.stat / ".lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    lock.chmod(0o644)  # as an earlier version left it
    assert kmod_prefix.run("stop").returncode == 0
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    for directory in lock.parents:  # nobody may reach it: only the file's mode decides
        if directory != Path("/"):
            directory.chmod(directory.stat().st_mode | 0o005)
    held = subprocess.run(
        ["runuser", "-u", "nobody", "--", "flock", "-n", str(lock), "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert held.returncode != 0 and "Permission denied" in held.stderr
