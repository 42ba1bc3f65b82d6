"""Issue 10 #1 and #2 performed for real: a user swaps a script or plants a log link under root.

Real users (``nobody``), real ``renameat2(RENAME_EXCHANGE)``, real symbolic
links. Root must refuse up front what a user could swap, and even a swap
that lands while stap runs must not get the user's script compiled or cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stapinit.initscript import ownership
from stapinit.initscript.cache import CacheRecord
from stapinit.initscript.ownership import Step, judge, walk
from tests.initscript.conftest import FakeTools
from tests.support.prefix import SUPPORT, Prefix

NOBODY = pwd.getpwnam("nobody")
ROOT_TEXT = 'probe begin { printf("root\'s script\\n") }\n'
USER_TEXT = 'probe begin { system("id > /tmp/owned") }\n'
DIR, REG, LNK = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK

# renameat2(2) with RENAME_EXCHANGE, through ctypes: what the attacker runs.
EXCHANGE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
def exchange(a, b):
    if libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), "renameat2", a)
"""


def reachable(path: Path) -> None:
    """Let other users walk down to ``path`` (as a real installation would)."""
    for directory in (path, *path.parents):
        if directory == Path("/"):
            break
        directory.chmod(directory.stat().st_mode | 0o005)


def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )


def refusal(where: Path | str, why: str, context: str = "") -> str:
    return f"systemtap-service: refusing to run as root: {where} {why}{context}\n"


# -- the rule, on its own ---------------------------------------------------------


def chain(*steps: tuple[str, int | None, int]) -> list[Step]:
    return [Step(path, uid, mode) for path, uid, mode in steps]


ROOT = ("/", 0, DIR | 0o755)
TMP = ("/tmp", 0, DIR | 0o1777)


@pytest.mark.parametrize(
    ("steps", "sticky_leaf_ok", "verdict"),
    [
        ([ROOT, ("/etc", 0, DIR | 0o755), ("/etc/x", 0, REG | 0o644)], False, None),
        # A user's directory anywhere above: they may rename what is below.
        (
            [ROOT, ("/srv", 1000, DIR | 0o755), ("/srv/s.d", 0, DIR | 0o755)],
            False,
            ("/srv", "is writable by uid 1000"),
        ),
        (
            [ROOT, ("/srv", 0, DIR | 0o775), ("/srv/s.d", 0, DIR | 0o755)],
            False,
            ("/srv", "is writable by group"),
        ),
        # /tmp on the way is fine when root's own entry comes next ...
        ([ROOT, TMP, ("/tmp/r", 0, DIR | 0o755), ("/tmp/r/x", 0, REG | 0o644)], False, None),
        # ... not when a user's does, nor when the next name is free to take.
        (
            [ROOT, TMP, ("/tmp/r", 1000, DIR | 0o755)],
            False,
            ("/tmp/r", "is writable by uid 1000"),
        ),
        (
            [ROOT, TMP, ("/tmp/r", None, 0)],
            False,
            ("/tmp/r", "does not exist, and others may create it in /tmp"),
        ),
        # TEMP_PATH may be /tmp itself (only mkdtemp is used there); nothing else may.
        ([ROOT, TMP], True, None),
        ([ROOT, TMP], False, ("/tmp", "is writable by others")),
        # Missing below a trusted directory: root creates it later.
        ([ROOT, ("/run", 0, DIR | 0o755), ("/run/st", None, 0)], False, None),
        # A link is judged by its owner, then its target by the rule.
        ([ROOT, ("/var/run", 0, LNK | 0o777), ("/run", 0, DIR | 0o755)], False, None),
        (
            [ROOT, TMP, ("/tmp/l", 1000, LNK | 0o777), ("/etc", 0, DIR | 0o755)],
            False,
            ("/tmp/l", "is a symbolic link owned by uid 1000"),
        ),
    ],
)
def test_the_chain_rule(
    steps: list[tuple[str, int | None, int]],
    sticky_leaf_ok: bool,
    verdict: tuple[str, str] | None,
) -> None:
    assert judge(chain(*steps), sticky_leaf_ok) == verdict


def test_walk_follows_links_as_the_kernel_does(tmp_path: Path) -> None:
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to("real/sub")
    (tmp_path / "up").symlink_to(tmp_path / "real" / "sub" / "..")
    walked = [step.path for step in walk(str(tmp_path / "link" / "file"))]
    assert walked[-4:] == [
        str(tmp_path / "link"),
        str(tmp_path / "real"),
        str(tmp_path / "real" / "sub"),
        str(tmp_path / "real" / "sub" / "file"),
    ]
    assert walk(str(tmp_path / "link" / "file"))[-1].uid is None  # missing, judged by its parent
    assert [s.path for s in walk(str(tmp_path / "up" / "sub"))][-1] == str(
        tmp_path / "real" / "sub"
    )


def test_a_nul_byte_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(ownership.UntrustedPathError, match="NUL"):
        walk(f"{tmp_path}/a\0b")
    with pytest.raises(OSError, match="NUL"):
        ownership.open_regular(f"{tmp_path}/a\0b")


# -- issue 10 #1: a user swaps their script into root's service ---------------------


@pytest.fixture
def user_above_scripts(kmod_prefix: Prefix, tmp_path: Path) -> tuple[Prefix, Path]:
    """SCRIPT_PATH (root's, with root's script) below a directory that ``nobody`` owns."""
    home = tmp_path / "home"
    scripts = home / "script.d"
    scripts.mkdir(parents=True)
    (scripts / "hello.stp").write_text(ROOT_TEXT)
    kmod_prefix.configure("hello")
    os.chown(home, NOBODY.pw_uid, NOBODY.pw_gid)
    reachable(home)
    kmod_prefix.write_config(SCRIPT_PATH=str(scripts))
    return kmod_prefix, home


def test_root_refuses_a_script_path_below_a_users_directory(
    user_above_scripts: tuple[Prefix, Path], fake_tools: FakeTools
) -> None:
    prefix, home = user_above_scripts
    scripts = home / "script.d"
    expected = refusal(
        home, f"is writable by uid {NOBODY.pw_uid}", f" (on the way to SCRIPT_PATH {scripts})"
    )
    for command in ("start", "compile"):
        done = prefix.run(command, "-y")
        assert (done.returncode, done.stdout, done.stderr) == (6, "", expected), command
    # What the check stands for: the user really can exchange root's script.d for theirs.
    swap = as_nobody(
        EXCHANGE
        + f"os.mkdir({str(home / 'mine')!r})\n"
        + f"open({str(home / 'mine' / 'hello.stp')!r}, 'w').write({USER_TEXT!r})\n"
        + f"exchange({str(scripts)!r}, {str(home / 'mine')!r})\n"
    )
    assert swap.returncode == 0, swap.stderr
    assert (scripts / "hello.stp").read_text() == USER_TEXT
    assert prefix.run("start").returncode == 6
    assert fake_tools.calls_of("stap") == [] and fake_tools.loaded() == []
    assert not prefix.cache_dir().exists()


SWAPPING_STAP = """#!{python}
import os, subprocess, sys
{exchange}
# Root's stap is running: this is the moment the attacker swaps script.d.
exchange({scripts!r}, {mine!r})
try:
    code = subprocess.call([sys.executable, {fake!r}, *sys.argv[1:]])
finally:
    exchange({scripts!r}, {mine!r})
sys.exit(code)
"""


def test_a_swap_while_stap_runs_cannot_get_the_users_script_cached(
    kmod_prefix: Prefix, fake_tools: FakeTools, tmp_path: Path
) -> None:
    """Even if a swap landed during the compile, stap compiles root's private copy."""
    script = kmod_prefix.add_script("hello", ROOT_TEXT)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "hello.stp").write_text(USER_TEXT)
    stap = tmp_path / "tools" / "stap"
    stap.parent.mkdir()
    stap.write_text(
        SWAPPING_STAP.format(
            python=sys.executable,
            exchange=EXCHANGE,
            scripts=str(kmod_prefix.scripts),
            mine=str(mine),
            fake=str(SUPPORT / "fake_stap.py"),
        )
    )
    stap.chmod(0o755)
    kmod_prefix.write_config(STAP=str(stap))
    started = kmod_prefix.run("start")
    assert started.returncode == 0, started.stderr
    assert (mine / "hello.stp").read_text() == USER_TEXT  # the swap did happen, and back
    built = json.loads((kmod_prefix.cache_dir() / "hello.ko").read_text())
    assert built["script"] == ROOT_TEXT
    record = CacheRecord.from_text((kmod_prefix.cache_dir() / "hello.opts").read_text())
    assert record is not None
    assert record.source == hashlib.sha256(script.read_bytes()).hexdigest()
    assert fake_tools.loaded() == ["hello"]
    # Later starts trust the cache because it holds root's script, not by accident.
    assert kmod_prefix.run("stop").returncode == 0
    assert kmod_prefix.run("start").returncode == 0
    assert len(fake_tools.calls_of("stap")) == 1


def test_what_a_compile_reads_is_judged_on_the_file_opened(tmp_path: Path) -> None:
    from stapinit.initscript.compiler import read_script

    shared = tmp_path / "shared.stp"
    shared.write_text(ROOT_TEXT)
    link = tmp_path / "link.stp"
    link.symlink_to(shared)  # an admin's link into script.d is fine
    assert read_script(link).data == ROOT_TEXT.encode()
    fifo = tmp_path / "fifo.stp"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="is not a regular file"):
        read_script(fifo)  # and it did not block
    os.chown(shared, NOBODY.pw_uid, NOBODY.pw_gid)
    for path in (shared, link):
        with pytest.raises(OSError, match=f"is writable by uid {NOBODY.pw_uid}"):
            read_script(path)


# -- issue 10 #2: root follows a user's symbolic link for LOG_FILE -----------------


def test_root_refuses_a_log_file_in_a_users_directory(
    kmod_prefix: Prefix, fake_tools: FakeTools, tmp_path: Path
) -> None:
    kmod_prefix.add_script("hello", ROOT_TEXT)
    secret = tmp_path / "root-only"
    secret.write_text("root's data\n")
    secret.chmod(0o600)
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chown(logs, NOBODY.pw_uid, NOBODY.pw_gid)
    reachable(logs)
    log_file = logs / "systemtap.log"
    kmod_prefix.write_config(LOG_FILE=str(log_file))
    planted = as_nobody(f"import os; os.symlink({str(secret)!r}, {str(log_file)!r})")
    assert planted.returncode == 0, planted.stderr
    expected = refusal(
        logs, f"is writable by uid {NOBODY.pw_uid}", f" (on the way to LOG_FILE {log_file})"
    )
    for command in ("start", "compile"):
        done = kmod_prefix.run(command, "-y")
        assert (done.returncode, done.stderr) == (6, expected), command
    # stop must work: it goes on, but never writes through the user's link ...
    done = kmod_prefix.run("stop")
    assert done.returncode == 0, done.stderr
    assert f"cannot write log file {log_file}: is a symbolic link" in done.stderr
    assert secret.read_text() == "root's data\n"
    # ... nor into a file of theirs.
    log_file.unlink()
    planted = as_nobody(f"open({str(log_file)!r}, 'w').close()")
    assert planted.returncode == 0, planted.stderr
    done = kmod_prefix.run("stop")
    assert done.returncode == 0, done.stderr
    assert f"refusing log file {log_file}: it is writable by uid {NOBODY.pw_uid}" in done.stderr
    assert log_file.read_text() == ""
    assert fake_tools.loaded() == []


def test_a_hard_link_in_place_of_the_log_is_refused(kmod_prefix: Prefix, tmp_path: Path) -> None:
    """Where fs.protected_hardlinks is off, a user could link root's files in."""
    kmod_prefix.add_script("hello", ROOT_TEXT)
    secret = tmp_path / "root-only"
    secret.write_text("root's data\n")
    os.link(secret, kmod_prefix.log_file)
    done = kmod_prefix.run("start")
    assert f"refusing log file {kmod_prefix.log_file}: it has other hard links" in done.stderr
    assert secret.read_text() == "root's data\n"
    assert kmod_prefix.run("stop").returncode == 0


def test_a_link_in_place_of_the_log_is_never_followed(kmod_prefix: Prefix, tmp_path: Path) -> None:
    kmod_prefix.add_script("hello", ROOT_TEXT)
    secret = tmp_path / "root-only"
    secret.write_text("root's data\n")
    kmod_prefix.log_file.symlink_to(secret)
    done = kmod_prefix.run("start")
    # The service goes on without its log (console only), never through the link.
    assert (
        f"warning: cannot write log file {kmod_prefix.log_file}: is a symbolic link;"
        " logging to the console only"
    ) in done.stderr
    assert secret.read_text() == "root's data\n"
    assert kmod_prefix.run("stop").returncode == 0
    assert secret.read_text() == "root's data\n"


def test_the_log_is_created_readable_by_root_and_its_group_only(kmod_prefix: Prefix) -> None:
    kmod_prefix.add_script("hello", ROOT_TEXT)
    assert kmod_prefix.run("start").returncode == 0
    assert stat.S_IMODE(kmod_prefix.log_file.stat().st_mode) == 0o640
    assert kmod_prefix.run("stop").returncode == 0


# -- siblings: tools found on PATH, paths in options, TEMP_PATH ---------------------


def test_a_tool_found_on_path_in_a_users_directory_is_refused(
    kmod_prefix: Prefix, fake_tools: FakeTools, tmp_path: Path
) -> None:
    kmod_prefix.add_script("hello", ROOT_TEXT)
    bin_dir = tmp_path / "userbin"
    bin_dir.mkdir()
    staprun = bin_dir / "staprun"
    staprun.write_text("#!/bin/sh\ntouch /tmp/owned\n")
    staprun.chmod(0o755)
    os.chown(bin_dir, NOBODY.pw_uid, NOBODY.pw_gid)
    kmod_prefix.write_config(STAPRUN="staprun")
    path = f"{bin_dir}:{os.environ['PATH']}"
    done = kmod_prefix.run("start", env={"PATH": path})
    assert (done.returncode, done.stderr) == (
        6,
        refusal(
            bin_dir, f"is writable by uid {NOBODY.pw_uid}", f" (on the way to STAPRUN {staprun})"
        ),
    )
    assert fake_tools.loaded() == []


def test_paths_named_by_options_are_judged_too(
    kmod_prefix: Prefix, fake_tools: FakeTools, tmp_path: Path
) -> None:
    tapsets = tmp_path / "tapsets"
    tapsets.mkdir()
    os.chown(tapsets, NOBODY.pw_uid, NOBODY.pw_gid)
    kmod_prefix.add_script("hello", ROOT_TEXT, options=f"-I {tapsets}")
    done = kmod_prefix.run("compile")
    assert (done.returncode, done.stderr) == (
        6,
        refusal(tapsets, f"is writable by uid {NOBODY.pw_uid}", " (named by hello_OPT -I)"),
    )
    # staprun -o writes as root: a sticky world-writable directory lets anyone plant the name.
    kmod_prefix.configure("hello", options="-o /tmp/hello.out")
    done = kmod_prefix.run("start")
    assert (done.returncode, done.stderr) == (
        6,
        refusal("/tmp", "is writable by others", " (named by hello_OPT -o /tmp/hello.out)"),
    )
    # staprun -c CMD runs CMD as root.
    program = tapsets / "collect"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    kmod_prefix.configure("hello", options=f"-c '{program} --all'")
    done = kmod_prefix.run("start")
    assert (done.returncode, done.stderr) == (
        6,
        refusal(
            tapsets,
            f"is writable by uid {NOBODY.pw_uid}",
            f" (on the way to hello_OPT -c {program} --all {program})",
        ),
    )
    assert fake_tools.calls_of("stap") == [] and fake_tools.loaded() == []


def test_stop_relies_only_on_configuration_status_and_staprun(kmod_prefix: Prefix) -> None:
    """``stop`` may leave out the scripts and caches it never executes (issue 13)."""
    from stapinit.initscript.settings import load_settings

    os.chown(kmod_prefix.scripts, NOBODY.pw_uid, NOBODY.pw_gid)
    settings = load_settings(kmod_prefix.config, environment={})
    with pytest.raises(ownership.UntrustedPathError, match=r"script\.d is writable by uid"):
        ownership.check_root_ownership(settings)
    ownership.check_root_ownership(settings, shutdown_only=True)
    os.chown(kmod_prefix.stat, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(ownership.UntrustedPathError, match=r"run is writable by uid"):
        ownership.check_root_ownership(settings, shutdown_only=True)


def test_a_missing_temp_path_in_tmp_is_refused(kmod_prefix: Prefix, tmp_path: Path) -> None:
    kmod_prefix.add_script("hello", ROOT_TEXT)
    missing = f"/tmp/stapinit-test-{os.getpid()}-{tmp_path.name}"
    kmod_prefix.write_config(TEMP_PATH=missing)
    done = kmod_prefix.run("compile")
    assert (done.returncode, done.stderr) == (
        6,
        refusal(missing, "does not exist, and others may create it in /tmp"),
    )


def test_every_file_a_tapset_directory_holds_is_judged(
    kmod_prefix: Prefix, fake_tools: FakeTools, tmp_path: Path
) -> None:
    tapsets = tmp_path / "tapsets"
    (tapsets / "sub").mkdir(parents=True)
    mine = tapsets / "sub" / "users.stp"  # root's directory, another user's file
    mine.write_text("function pid() { return 0 }\n")
    os.chown(mine, NOBODY.pw_uid, NOBODY.pw_gid)
    kmod_prefix.add_script("hello", ROOT_TEXT, options=f"-I {tapsets}")
    done = kmod_prefix.run("compile")
    assert done.returncode == 6
    assert f"{mine} is writable by uid {NOBODY.pw_uid}" in done.stderr, done.stderr
    assert fake_tools.calls_of("stap") == []
    # A root-owned link there into a user's directory is judged where it leads.
    os.chown(mine, 0, 0)
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, NOBODY.pw_uid, NOBODY.pw_gid)
    (home / "evil.stp").write_text("probe begin { }\n")
    (tapsets / "link.stp").symlink_to(home / "evil.stp")
    done = kmod_prefix.run("compile")
    assert done.returncode == 6 and f"{home} is writable by uid {NOBODY.pw_uid}" in done.stderr
