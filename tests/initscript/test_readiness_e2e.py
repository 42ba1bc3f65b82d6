"""Readiness, one-shot scripts and starts killed at any moment, with the real stapbpf."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from tests.support.prefix import COMMAND, Prefix, process_alive, wait_for

UP = 'probe begin { println("up") }\nprobe timer.ms(100) { }\n'
ONE_SHOT = 'probe begin { println("checked"); exit() }\n'


def slow_stapbpf(tmp_path: Path, stapbpf_wrapper: Path, delay: float) -> Path:
    """A stapbpf that takes ``delay`` seconds before it starts loading (a loaded boot)."""
    slow = tmp_path / "slow-stapbpf"
    slow.write_text(f'#!/bin/sh\nsleep {delay}\nexec {stapbpf_wrapper} "$@"\n')
    slow.chmod(0o755)
    return slow


def our_stapbpfs(prefix: Prefix) -> dict[str, list[int]]:
    """Every process whose last argument is one of the prefix's cached BPF modules."""
    found: dict[str, list[int]] = {}
    modules = {str(p): p.stem for p in prefix.cache_dir().glob("*.bo")}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if argv and argv[-1].decode(errors="replace") in modules and process_alive(int(entry)):
            found.setdefault(modules[argv[-1].decode()], []).append(int(entry))
    return found


def test_start_returns_only_once_begin_has_run(
    bpf_prefix: Prefix, tmp_path: Path, stapbpf_wrapper: Path
) -> None:
    out = bpf_prefix.root / "up.out"
    bpf_prefix.add_script("up", UP, options=f"--runtime=bpf -o {out}")
    assert bpf_prefix.run("compile").returncode == 0
    bpf_prefix.write_config(STAPBPF=str(slow_stapbpf(tmp_path, stapbpf_wrapper, 1.0)))
    began = time.monotonic()
    done = bpf_prefix.run("start")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - began >= 1.0  # no fixed grace: it waited for stapbpf
    assert "up" in out.read_text().split()  # the begin probe had run when start returned
    assert bpf_prefix.status_json()["up"]["state"] == "running"
    assert bpf_prefix.run("stop").returncode == 0


def test_a_script_failing_after_a_slow_load_is_a_failed_start(
    bpf_prefix: Prefix, tmp_path: Path, stapbpf_wrapper: Path
) -> None:
    bpf_prefix.add_script("late", UP, options="--runtime=bpf")
    assert bpf_prefix.run("compile").returncode == 0
    module = bpf_prefix.cache_dir() / "late.bo"
    module.write_bytes(b"\x7fELF but not really")  # newer than the script: still "valid"
    bpf_prefix.write_config(STAPBPF=str(slow_stapbpf(tmp_path, stapbpf_wrapper, 0.8)))
    done = bpf_prefix.run("start")
    assert done.returncode == 1
    assert "Failed to start late: stapbpf failed (exit status 1)" in done.stderr
    assert not (bpf_prefix.stat / "late").exists()
    assert our_stapbpfs(bpf_prefix) == {}
    assert bpf_prefix.status_json()["late"]["state"] == "stopped"


def test_a_script_not_ready_in_time_is_stopped_and_failed(
    bpf_prefix: Prefix, tmp_path: Path, stapbpf_wrapper: Path
) -> None:
    bpf_prefix.add_script("sleepy", UP, options="--runtime=bpf")
    assert bpf_prefix.run("compile").returncode == 0
    slow = slow_stapbpf(tmp_path, stapbpf_wrapper, 30)
    bpf_prefix.write_config(STAPBPF=str(slow), START_TIMEOUT="0.5")
    done = bpf_prefix.run("start")
    assert done.returncode == 1
    assert "stapbpf not ready after 0.5s; stopped it" in done.stderr
    assert not (bpf_prefix.stat / "sleepy").exists()


def test_a_one_shot_script_ran_and_exited(bpf_prefix: Prefix) -> None:
    out = bpf_prefix.root / "check.out"
    bpf_prefix.add_script("check", ONE_SHOT, options=f"--runtime=bpf -o {out}")
    done = bpf_prefix.run("start")
    assert done.returncode == 0, done.stderr
    assert "check ran and exited (status 0)" in done.stdout
    assert out.read_text().split() == ["checked"]
    status = bpf_prefix.run("status")
    assert status.returncode == 0 and "check ran and exited (status 0)" in status.stdout
    assert bpf_prefix.status_json()["check"]["exit_status"] == 0
    assert bpf_prefix.run("stop").returncode == 0
    assert not (bpf_prefix.stat / "check").exists()


def test_start_killed_at_any_moment_loses_no_process(bpf_prefix: Prefix) -> None:
    names = ("k1", "k2", "k3", "k4")
    for name in names:
        bpf_prefix.add_script(name, UP, options="--runtime=bpf")
    assert bpf_prefix.run("compile").returncode == 0
    chance = random.Random(12)
    for _ in range(8):
        with subprocess.Popen(
            [COMMAND, "start", "-c", str(bpf_prefix.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as start:
            time.sleep(chance.uniform(0.0, 0.25))
            start.send_signal(signal.SIGKILL)
        # The next start finds what the killed one left and runs nothing twice.
        again = bpf_prefix.run("start")
        assert again.returncode == 0, again.stderr
        running = our_stapbpfs(bpf_prefix)
        assert sorted(running) == list(names)
        assert all(len(pids) == 1 for pids in running.values()), running
        stopped = bpf_prefix.run("stop")
        assert stopped.returncode == 0, stopped.stderr
        assert wait_for(lambda: our_stapbpfs(bpf_prefix) == {}, timeout=10)


def test_stop_finds_a_process_whose_start_was_killed_before_any_record(
    bpf_prefix: Prefix, stapbpf_wrapper: Path
) -> None:
    bpf_prefix.add_script("lost", UP, options="--runtime=bpf")
    assert bpf_prefix.run("compile").returncode == 0
    module = bpf_prefix.cache_dir() / "lost.bo"
    # What a start killed between fork and record leaves behind.
    orphan = subprocess.Popen(
        [str(stapbpf_wrapper), str(module)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert wait_for(lambda: "lost" in our_stapbpfs(bpf_prefix))
    status = bpf_prefix.run("status")  # looks, writes nothing
    assert status.returncode == 0 and f"lost({orphan.pid}) is running..." in status.stdout
    assert not (bpf_prefix.stat / "lost").exists()
    stopped = bpf_prefix.run("stop")
    assert stopped.returncode == 0 and "Stopped lost" in stopped.stdout, stopped.stderr
    assert orphan.wait(timeout=10) is not None


def test_a_start_after_a_killed_one_waits_for_what_is_still_loading(
    bpf_prefix: Prefix, tmp_path: Path, stapbpf_wrapper: Path
) -> None:
    out = bpf_prefix.root / "late.out"
    bpf_prefix.add_script("base", UP, options=f"--runtime=bpf -o {out}")
    bpf_prefix.add_script("user", UP, options="--runtime=bpf", requires="base")
    assert bpf_prefix.run("compile").returncode == 0
    bpf_prefix.write_config(STAPBPF=str(slow_stapbpf(tmp_path, stapbpf_wrapper, 2.0)))
    with subprocess.Popen(
        [COMMAND, "start", "-c", str(bpf_prefix.config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as start:
        assert wait_for(lambda: (bpf_prefix.stat / "base").exists())
        start.send_signal(signal.SIGKILL)
    assert bpf_prefix.status_json()["base"]["state"] == "starting"
    again = bpf_prefix.run("start")
    assert again.returncode == 0, again.stderr
    assert "base is already running" not in again.stdout
    assert (
        again.stdout.splitlines()[:2]
        == [line for line in again.stdout.splitlines() if line.startswith("Started")][:2]
    )
    assert "up" in out.read_text().split()  # base's begin had run before start returned
    assert sorted(our_stapbpfs(bpf_prefix)) == ["base", "user"]
    assert all(len(p) == 1 for p in our_stapbpfs(bpf_prefix).values())
    assert bpf_prefix.run("stop").returncode == 0
