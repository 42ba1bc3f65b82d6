"""What root runs: tools found on the system PATH alone, and only if root alone can change them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from stapinit.core.tools import private_workdir, resolve_tool, root_only_problem, tool_for_root
from tests.trust.people import User, ensure_users, shared_tmpdir


@pytest.fixture(scope="module")
def plain() -> User:
    return ensure_users()["sttest_plain"]


@pytest.fixture
def base() -> Iterator[Path]:
    path = shared_tmpdir("sttest-tools-")
    yield path
    shutil.rmtree(path)


def test_tools_are_found_in_the_system_path_only() -> None:
    assert resolve_tool("sh") in ("/usr/bin/sh", "/bin/sh", "/usr/local/bin/sh")
    assert resolve_tool("/opt/x/stapbpf") == "/opt/x/stapbpf"
    with pytest.raises(ValueError, match="must be absolute"):
        resolve_tool("./stapbpf")
    with pytest.raises(ValueError, match="not found in /usr/local/sbin"):
        resolve_tool("no-such-tool-anywhere")


def test_a_system_tool_is_fit_for_root() -> None:
    assert tool_for_root("sh") == resolve_tool("sh")


def test_a_tool_a_user_could_change_is_not_run_by_root(base: Path, plain: User) -> None:
    tool = base / "stapbpf"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert tool_for_root(str(tool)) == str(tool)
    os.chown(tool, plain.uid, plain.gid)
    with pytest.raises(ValueError, match=f"will not run {tool} as root: .* uid {plain.uid}"):
        tool_for_root(str(tool))
    os.chown(tool, 0, 0)
    tool.chmod(0o757)
    assert root_only_problem(tool) == f"{tool} is writable by others (mode 0757)"
    tool.chmod(0o755)
    # Through a symlink to a user's file, or in a directory a user owns.
    own = base / "own"
    own.mkdir()
    os.chown(own, plain.uid, plain.gid)
    link = base / "link"
    link.symlink_to(own / "evil")
    (own / "evil").write_text("#!/bin/sh\n")
    # root's own file, but the user may rename it away and put theirs in its place
    assert root_only_problem(link) == f"{own} is owned by uid {plain.uid}, not root"
    assert root_only_problem(base / "missing") is not None


def test_a_sticky_world_writable_directory_above_is_fine(base: Path) -> None:
    # /tmp: nobody may rename another's entries there.
    assert root_only_problem(base) is None
    assert root_only_problem("/tmp") is not None
    assert root_only_problem("/tmp", sticky_ok=True) is None


def test_roots_work_directory_ignores_a_users_tmpdir(
    base: Path, plain: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    users_tmp = base / "usertmp"
    users_tmp.mkdir()
    os.chown(users_tmp, plain.uid, plain.gid)
    monkeypatch.setenv("TMPDIR", str(users_tmp))
    monkeypatch.setattr("tempfile.tempdir", None)  # forget the cached choice
    work = private_workdir("sttest-")
    try:
        assert work.parent == Path("/tmp")
        assert (work.stat().st_mode & 0o777, work.stat().st_uid) == (0o700, 0)
    finally:
        work.rmdir()
