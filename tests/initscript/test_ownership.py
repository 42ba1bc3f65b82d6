"""As root, systemtap-service refuses configuration, scripts and tools that others can change."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapinit.initscript.ownership import writable_by
from tests.initscript.conftest import FakeTools
from tests.support.prefix import Prefix

DIR = stat.S_IFDIR
REG = stat.S_IFREG
NOBODY = pwd.getpwnam("nobody")


@pytest.mark.parametrize(
    ("uid", "mode", "sticky_ok", "expected"),
    [
        (0, DIR | 0o755, False, None),
        (0, REG | 0o644, False, None),
        (0, DIR | 0o700, False, None),
        (0, DIR | 0o775, False, "group"),
        (0, REG | 0o664, False, "group"),
        (0, DIR | 0o777, False, "others"),
        (0, REG | 0o646, False, "others"),
        (1000, REG | 0o600, False, "uid 1000"),
        (1000, DIR | 0o1777, True, "uid 1000"),
        (0, DIR | 0o1777, True, None),  # /tmp as TEMP_PATH
        (0, DIR | 0o1777, False, "others"),  # /tmp as anything else
        (0, DIR | 0o777, True, "others"),  # not sticky: others may rename root's files
        (0, REG | 0o1777, True, "others"),  # stickiness means nothing on a file
    ],
)
def test_who_may_change_a_path(uid: int, mode: int, sticky_ok: bool, expected: str | None) -> None:
    assert writable_by(uid, mode, sticky_ok) == expected


@given(st.integers(0, 0o7777), st.booleans())
def test_root_owned_paths_writable_by_nobody_else_always_pass(perms: int, directory: bool) -> None:
    mode = (DIR if directory else REG) | (perms & ~0o022)
    assert writable_by(0, mode) is None
    assert writable_by(0, mode | 0o002) == "others"
    assert writable_by(0, mode | 0o020) == "group"


EVIL = "#!/bin/sh\ntouch {marker}\nexit 1\n"


@pytest.fixture
def planted(kmod_prefix: Prefix, tmp_path: Path) -> tuple[Prefix, Path]:
    """A script to start, and an executable that proves it ran by creating a marker."""
    kmod_prefix.add_script("mine", "probe begin { }\n")
    marker = tmp_path / "evil-ran"
    evil = tmp_path / "evil"
    evil.write_text(EVIL.format(marker=marker))
    evil.chmod(0o755)
    return kmod_prefix, marker


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under ``root``: owner, mode and contents."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
        found[str(path.relative_to(root))] = (info.st_uid, info.st_mode, data)
    return found


def assert_refused(
    prefix: Prefix,
    fake_tools: FakeTools,
    marker: Path,
    path: Path,
    who: str,
    shutdown_too: bool = True,
    context: str = "",
) -> None:
    """start and compile refuse; stop and status too when ``shutdown_too``.

    Otherwise the path is one that stopping never runs anything from (the
    scripts, the cache, ``STAP``): stop and status go on with a warning, as
    shutdown must work, and run nothing.
    """
    before = snapshot(prefix.root)
    refusal = f"refusing to run as root: {path} is writable by {who}"
    for command in ("start", "stop", "status", "compile"):
        done = prefix.run(command, "-y")
        if shutdown_too or command in ("start", "compile"):
            code = 4 if command == "status" else 6
            assert (done.returncode, done.stdout, done.stderr) == (
                code,
                "",
                f"systemtap-service: {refusal}{context}\n",
            ), command
        else:
            assert done.returncode == (3 if command == "status" else 0), command
            assert f"warning: {refusal}{context}; going on" in done.stderr, command
    assert not marker.exists()
    assert fake_tools.calls_of("stap") == [] and fake_tools.calls_of("staprun") == []
    if shutdown_too:
        assert snapshot(prefix.root) == before  # no log, no lock, no cache, no status


def test_world_writable_conf_d_is_refused_and_nothing_runs(
    planted: tuple[Prefix, Path], fake_tools: FakeTools, tmp_path: Path
) -> None:
    prefix, marker = planted
    conf_d = prefix.root / "conf.d"
    conf_d.chmod(0o777)
    # What any user could then do: point STAP at their own program.
    (conf_d / "zz.conf").write_text(f"STAP={tmp_path / 'evil'}\n")
    assert_refused(prefix, fake_tools, marker, conf_d, "others")


def test_conf_file_owned_by_another_user_is_refused(
    planted: tuple[Prefix, Path], fake_tools: FakeTools, tmp_path: Path
) -> None:
    prefix, marker = planted
    conf = prefix.root / "conf.d" / "zz.conf"
    conf.write_text(f"STAPRUN={tmp_path / 'evil'}\n")
    os.chown(conf, NOBODY.pw_uid, NOBODY.pw_gid)
    assert_refused(prefix, fake_tools, marker, conf, f"uid {NOBODY.pw_uid}")


def test_group_writable_global_config_is_refused(
    planted: tuple[Prefix, Path], fake_tools: FakeTools
) -> None:
    prefix, marker = planted
    prefix.config.chmod(0o664)
    assert_refused(prefix, fake_tools, marker, prefix.config, "group")


def test_script_another_user_may_edit_is_refused(
    planted: tuple[Prefix, Path], fake_tools: FakeTools
) -> None:
    prefix, marker = planted
    script = prefix.scripts / "mine.stp"
    os.chown(script, NOBODY.pw_uid, NOBODY.pw_gid)
    assert_refused(prefix, fake_tools, marker, script, f"uid {NOBODY.pw_uid}", shutdown_too=False)


def test_tool_in_a_directory_others_may_write_is_refused(
    planted: tuple[Prefix, Path], fake_tools: FakeTools, tmp_path: Path
) -> None:
    prefix, marker = planted
    tools = tmp_path / "tools"
    tools.mkdir(mode=0o777)
    tools.chmod(0o777)
    staprun = tools / "staprun"
    staprun.write_text(EVIL.format(marker=marker))
    staprun.chmod(0o755)
    prefix.write_config(STAPRUN=str(staprun))
    assert_refused(
        prefix, fake_tools, marker, tools, "others", context=f" (on the way to STAPRUN {staprun})"
    )


def test_status_and_cache_directories_are_checked(
    planted: tuple[Prefix, Path], fake_tools: FakeTools
) -> None:
    prefix, marker = planted
    os.chown(prefix.stat, NOBODY.pw_uid, NOBODY.pw_gid)
    assert_refused(prefix, fake_tools, marker, prefix.stat, f"uid {NOBODY.pw_uid}")
    os.chown(prefix.stat, 0, 0)
    cache = prefix.cache_dir()
    cache.mkdir(mode=0o775)
    cache.chmod(0o775)
    assert_refused(prefix, fake_tools, marker, cache, "group", shutdown_too=False)


def test_sticky_temp_path_and_missing_directories_are_fine(
    planted: tuple[Prefix, Path], fake_tools: FakeTools
) -> None:
    prefix, marker = planted
    sticky = prefix.root / "sticky-tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    prefix.write_config(TEMP_PATH=str(sticky), STAT_PATH=str(prefix.root / "not-yet" / "run"))
    started = prefix.run("start")
    assert started.returncode == 0, started.stderr
    assert fake_tools.loaded() == ["mine"]
    assert prefix.run("stop").returncode == 0
    assert not marker.exists()


def test_a_user_is_not_refused_what_root_would_be(planted: tuple[Prefix, Path]) -> None:
    """The check protects root; as another user, the files' permissions decide."""
    prefix, _ = planted
    (prefix.root / "conf.d").chmod(0o777)
    done = prefix.run_as("nobody", "status")
    assert (done.returncode, done.stderr) == (3, "")
    assert "mine is stopped" in done.stdout
