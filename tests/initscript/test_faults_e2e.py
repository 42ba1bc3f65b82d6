"""Shutdown works whatever else is broken; junk in the service's own directories is skipped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.initscript.conftest import FakeTools
from tests.initscript.test_run_kmod_e2e import SCRIPT, wrapped_staprun
from tests.support.prefix import COMMAND, Prefix, process_alive

UP = 'probe begin { println("up") }\nprobe timer.ms(100) { }\n'


def start_two(prefix: Prefix) -> list[int]:
    for name in ("s1", "s2"):
        prefix.add_script(name, UP, options="--runtime=bpf")
    done = prefix.run("start")
    assert done.returncode == 0, done.stderr
    pids = [prefix.status_json()[name]["pid"] for name in ("s1", "s2")]
    assert all(isinstance(pid, int) and process_alive(pid) for pid in pids)
    return pids


def break_passall(prefix: Prefix) -> None:
    prefix.write_config(PASSALL="maybe")


def break_another_scripts_options(prefix: Prefix) -> None:
    prefix.add_script("s3", UP, options="--runtime=bpf -o 'unterminated")


def break_a_requirement(prefix: Prefix) -> None:
    prefix.configure("s2", options="--runtime=bpf", requires="no-such")


def move_script_path(prefix: Prefix) -> None:
    prefix.scripts.rename(prefix.root / "moved-away")


def open_script_path_to_everyone(prefix: Prefix) -> None:
    prefix.scripts.chmod(0o777)


@pytest.mark.parametrize(
    "breakage",
    [
        break_passall,
        break_another_scripts_options,
        break_a_requirement,
        move_script_path,
        open_script_path_to_everyone,
    ],
)
def test_stop_stops_everything_whatever_else_is_broken(
    bpf_prefix: Prefix, breakage: object
) -> None:
    pids = start_two(bpf_prefix)
    assert callable(breakage)
    breakage(bpf_prefix)
    status = bpf_prefix.run("status", "s1", "s2")
    assert status.returncode == 0, status.stderr  # LSB: both still run
    assert f"s1({pids[0]}) is running..." in status.stdout
    stopped = bpf_prefix.run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "warning:" in stopped.stderr
    assert not any(process_alive(pid) for pid in pids)
    assert not (bpf_prefix.stat / "s1").exists() and not (bpf_prefix.stat / "s2").exists()


def test_a_log_on_a_full_file_system_costs_one_warning(bpf_prefix: Prefix) -> None:
    pids = start_two(bpf_prefix)
    bpf_prefix.write_config(LOG_FILE="/dev/full")
    stopped = bpf_prefix.run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.count("cannot write log file /dev/full") == 1
    assert "Stopped s1" in stopped.stdout and "Stopped s2" in stopped.stdout
    assert not any(process_alive(pid) for pid in pids)


def test_a_fifo_or_link_in_stat_path_never_blocks_or_crashes(bpf_prefix: Prefix) -> None:
    bpf_prefix.add_script("f1", UP, options="--runtime=bpf")
    bpf_prefix.add_script("z1", UP, options="--runtime=bpf")
    os.mkfifo(bpf_prefix.stat / "f1")
    (bpf_prefix.stat / "z1").symlink_to("/dev/zero")
    status = bpf_prefix.run("status", timeout=20)
    assert status.returncode == 3 and "Traceback" not in status.stderr
    started = bpf_prefix.run("start", timeout=60)
    assert "Traceback" not in started.stderr
    assert bpf_prefix.run("stop", timeout=60).returncode == 0


def test_sigterm_ends_a_hung_loader_promptly(
    kmod_prefix: Prefix, fake_tools: FakeTools, tmp_path: Path
) -> None:
    hung = wrapped_staprun(tmp_path, "sleep 1000")
    kmod_prefix.add_script("stuck", SCRIPT)
    assert kmod_prefix.run("compile").returncode == 0
    kmod_prefix.write_config(STAPRUN=str(hung))
    env = {**os.environ, **fake_tools.env}
    with subprocess.Popen(
        [COMMAND, "start", "-c", str(kmod_prefix.config)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    ) as start:
        time.sleep(1.0)  # staprun is hanging now
        began = time.monotonic()
        start.send_signal(signal.SIGTERM)
        _, stderr = start.communicate(timeout=30)
    assert time.monotonic() - began < 10
    assert start.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not (kmod_prefix.stat / "stuck").exists()


def test_a_hung_loader_is_bounded_by_load_timeout(
    kmod_prefix: Prefix, fake_tools: FakeTools, tmp_path: Path
) -> None:
    kmod_prefix.add_script("stuck", SCRIPT)
    assert kmod_prefix.run("compile").returncode == 0
    kmod_prefix.write_config(STAPRUN=str(wrapped_staprun(tmp_path, "sleep 1000")), LOAD_TIMEOUT="1")
    done = kmod_prefix.run("start", timeout=30)
    assert done.returncode == 1
    assert "did not finish within 1s; stopped it" in done.stderr


def test_status_json_of_an_unknown_script_is_json(bpf_prefix: Prefix) -> None:
    bpf_prefix.add_script("known", UP, options="--runtime=bpf")
    done = bpf_prefix.run("status", "--json", "nosuch")
    assert done.returncode == 4
    assert json.loads(done.stdout)["error"] == "no such script: nosuch"


def test_condrestart_of_an_unknown_script_is_exit_5_like_restart(bpf_prefix: Prefix) -> None:
    bpf_prefix.add_script("known", UP, options="--runtime=bpf")
    for command in ("restart", "condrestart", "try-restart"):
        done = bpf_prefix.run(command, "nosuch")
        assert done.returncode == 5, command
        assert "no such script: nosuch" in done.stderr


def test_stop_wins_over_a_start_stuck_on_a_loader(
    kmod_prefix: Prefix, fake_tools: FakeTools, tmp_path: Path
) -> None:
    kmod_prefix.add_script("stuck", SCRIPT)
    assert kmod_prefix.run("compile").returncode == 0
    kmod_prefix.write_config(STAPRUN=str(wrapped_staprun(tmp_path, "sleep 1000")))
    env = {**os.environ, **fake_tools.env}
    with subprocess.Popen(
        [COMMAND, "start", "-c", str(kmod_prefix.config)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    ) as start:
        time.sleep(1.0)  # start holds the lock, waiting for staprun
        began = time.monotonic()
        stopped = kmod_prefix.run("stop", timeout=60)
        assert time.monotonic() - began < 20  # not LOCK_TIMEOUT, not START_TIMEOUT
        _, stderr = start.communicate(timeout=30)
    assert stopped.returncode == 0, stopped.stderr
    assert "to give up" in stopped.stderr
    assert start.returncode == 130 and "interrupted" in stderr
    assert fake_tools.loaded() == []
    assert not (kmod_prefix.stat / "stuck").exists()


def test_stop_works_when_stat_path_is_full(bpf_prefix: Prefix, tmp_path: Path) -> None:
    pids = start_two(bpf_prefix)
    # A STAT_PATH whose file system is full: the lock's holder note cannot be written.
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(full)], check=True
    )
    try:
        for record in bpf_prefix.stat.iterdir():
            (full / record.name).write_bytes(record.read_bytes())
        with contextlib.suppress(OSError), (full / "filler").open("wb") as filler:
            filler.write(b"\0" * (1 << 20))
        bpf_prefix.write_config(STAT_PATH=str(full))
        stopped = bpf_prefix.run("stop")
        assert stopped.returncode == 0, stopped.stderr
        assert not any(process_alive(pid) for pid in pids)
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
