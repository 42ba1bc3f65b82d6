"""start, stop, restart and status with the real stap and the real stapbpf."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
from pathlib import Path

from tests.support.prefix import COMMAND, Prefix, process_alive, wait_for

TICK = (
    "global n\n"
    'probe timer.ms(50) { n++; printf("tick %d\\n", n) }\n'
    'probe end { printf("end\\n") }\n'
)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def add_ticker(prefix: Prefix, name: str, requires: str = "", text: str = TICK) -> Path:
    out = prefix.root / f"{name}.out"
    prefix.add_script(name, text, options=f"--runtime=bpf -o {out}", requires=requires)
    return out


def pid_of(prefix: Prefix, name: str) -> int:
    pid = prefix.status_json()[name]["pid"]
    assert isinstance(pid, int)
    return pid


def test_start_one_output_grows_and_status_says_running(bpf_prefix: Prefix) -> None:
    out = add_ticker(bpf_prefix, "ticker")
    done = bpf_prefix.run("start", "ticker")
    assert done.returncode == 0, done.stderr
    pid = pid_of(bpf_prefix, "ticker")
    assert process_alive(pid)
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2].endswith(b"ticker.bo")
    first = lines(out)
    assert wait_for(lambda: lines(out) > first + 3)
    status = bpf_prefix.run("status")
    assert status.returncode == 0
    assert f"ticker({pid}) is running..." in status.stdout
    assert (bpf_prefix.stat / "ticker").exists()
    again = bpf_prefix.run("start", "ticker")
    assert again.returncode == 0 and "ticker is already running" in again.stdout
    assert pid_of(bpf_prefix, "ticker") == pid
    stopped = bpf_prefix.run("stop")
    assert stopped.returncode == 0 and "Stopped ticker" in stopped.stdout
    assert not process_alive(pid)
    # SIGTERM let stapbpf run the end probe.
    assert out.read_text().splitlines()[-1] == "end"
    assert not (bpf_prefix.stat / "ticker").exists()
    status = bpf_prefix.run("status")
    assert status.returncode == 3 and "ticker is stopped" in status.stdout


def test_start_all_named_alone_and_with_requirements(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "base")
    add_ticker(bpf_prefix, "top", requires="base")
    add_ticker(bpf_prefix, "other")
    alone = bpf_prefix.run("start", "top")
    assert alone.returncode == 0, alone.stderr
    states = {n: s["state"] for n, s in bpf_prefix.status_json().items()}
    assert states == {"base": "stopped", "top": "running", "other": "stopped"}
    status = bpf_prefix.run("status", "top")
    assert "requires: base (base not running)" in status.stdout
    assert bpf_prefix.run("stop").returncode == 0

    recursive = bpf_prefix.run("start", "-R", "top")
    assert recursive.returncode == 0
    started = [
        line.split()[1] for line in recursive.stdout.splitlines() if line.startswith("Started")
    ]
    assert started == ["base", "top"]
    assert bpf_prefix.status_json()["other"]["state"] == "stopped"

    everything = bpf_prefix.run("start")
    assert everything.returncode == 0
    assert {s["state"] for s in bpf_prefix.status_json().values()} == {"running"}
    stop = bpf_prefix.run("stop")
    stopped = [line.split()[1] for line in stop.stdout.splitlines() if line.startswith("Stopped")]
    # Dependents stop before what they require.
    assert stopped.index("top") < stopped.index("base")
    assert {s["state"] for s in bpf_prefix.status_json().values()} == {"stopped"}


def test_default_start_limits_a_plain_start(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "wanted")
    add_ticker(bpf_prefix, "unwanted")
    bpf_prefix.write_config(DEFAULT_START="wanted")
    assert bpf_prefix.run("start").returncode == 0
    states = {n: s["state"] for n, s in bpf_prefix.status_json().items()}
    assert states == {"wanted": "running", "unwanted": "stopped"}
    assert bpf_prefix.run("stop").returncode == 0


def test_failed_requirement_keeps_dependent_from_starting(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "broken", text="probe begin { x = }\n")
    add_ticker(bpf_prefix, "needs", requires="broken")
    add_ticker(bpf_prefix, "free")

    strict = bpf_prefix.run("start")
    assert strict.returncode == 1
    assert "Failed to compile broken" in strict.stderr
    assert "not started, as PASSALL=yes and a script failed: free needs" in strict.stderr
    assert "start failed: broken" in strict.stderr
    assert {s["state"] for s in bpf_prefix.status_json().values()} == {"stopped"}

    bpf_prefix.write_config(PASSALL="no")
    lenient = bpf_prefix.run("start")
    assert lenient.returncode == 0
    assert "needs not started: requirement broken failed" in lenient.stderr
    assert "warning: start failed for some scripts: broken needs" in lenient.stderr
    states = {n: s["state"] for n, s in bpf_prefix.status_json().items()}
    assert states == {"broken": "stopped", "needs": "stopped", "free": "running"}
    assert bpf_prefix.run("stop").returncode == 0


def test_restart_produces_new_output(bpf_prefix: Prefix) -> None:
    out = add_ticker(bpf_prefix, "ticker")
    assert bpf_prefix.run("start").returncode == 0
    old_pid = pid_of(bpf_prefix, "ticker")
    assert wait_for(lambda: lines(out) > 2)
    done = bpf_prefix.run("restart")
    assert done.returncode == 0, done.stderr
    new_pid = pid_of(bpf_prefix, "ticker")
    assert new_pid != old_pid and not process_alive(old_pid)
    assert wait_for(lambda: "tick 3" in out.read_text() and "end" not in out.read_text())
    assert bpf_prefix.run("condrestart").returncode == 0
    assert pid_of(bpf_prefix, "ticker") != new_pid
    assert bpf_prefix.run("stop").returncode == 0
    quiet = bpf_prefix.run("try-restart")
    assert quiet.returncode == 0 and "nothing to restart" in quiet.stdout
    assert bpf_prefix.status_json()["ticker"]["state"] == "stopped"


def test_killed_from_outside_is_reported_dead_and_cleaned_by_stop(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "victim")
    assert bpf_prefix.run("start").returncode == 0
    pid = pid_of(bpf_prefix, "victim")
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not process_alive(pid))
    status = bpf_prefix.run("status")
    assert status.returncode == 1
    assert "victim is dead, but pidfile exists" in status.stdout
    stop = bpf_prefix.run("stop")
    assert stop.returncode == 0 and "victim was dead; removed its status file" in stop.stdout
    assert not (bpf_prefix.stat / "victim").exists()
    assert bpf_prefix.run("status").returncode == 3


def test_two_concurrent_starts_load_each_script_once(bpf_prefix: Prefix) -> None:
    for name in ("one", "two"):
        add_ticker(bpf_prefix, name)
    env = {**os.environ}
    args = [COMMAND, "start", "-c", str(bpf_prefix.config)]
    runs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=60)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert sum(o.count("Started one") for o in outputs) == 1
    assert sum(o.count("Started two") for o in outputs) == 1
    for name in ("one", "two"):
        module = str(bpf_prefix.cache_dir() / f"{name}.bo").encode()
        loaders = [
            p
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _cmdline(p).endswith(module + b"\0")
        ]
        assert len(loaders) == 1
    assert bpf_prefix.run("stop").returncode == 0


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_held_lock_fails_clearly_naming_the_holder(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "ticker")
    bpf_prefix.write_config(LOCK_TIMEOUT="0.5")
    lock = bpf_prefix.stat / ".lock"
    with lock.open("w") as handle:
        handle.write("pid 4242: start\n")
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_EX)
        done = bpf_prefix.run("start")
    assert done.returncode == 1
    assert "another systemtap-service holds" in done.stderr and "pid 4242: start" in done.stderr
    assert bpf_prefix.status_json()["ticker"]["state"] == "stopped"


def test_a_script_that_fails_to_load_is_a_failed_start(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "corrupt")
    assert bpf_prefix.run("compile").returncode == 0
    module = bpf_prefix.cache_dir() / "corrupt.bo"
    stat = module.stat()
    module.write_bytes(b"\x7fELF garbage")
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    done = bpf_prefix.run("start")
    assert done.returncode == 1
    assert "Failed to start corrupt: stapbpf failed (exit status 1): Error loading" in done.stderr
    assert not (bpf_prefix.stat / "corrupt").exists()


def test_missing_stapbpf_is_one_clear_line(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "ticker")
    bpf_prefix.write_config(STAPBPF="/nonexistent/stapbpf")
    done = bpf_prefix.run("start")
    assert done.returncode == 1
    assert "cannot run /nonexistent/stapbpf: No such file or directory" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (bpf_prefix.stat / "ticker").exists()


def test_start_needs_root(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "ticker")
    done = bpf_prefix.run_as("nobody", "start")
    assert done.returncode == 4
    assert done.stderr.strip() == "systemtap-service: start must be run as root"


def test_no_scripts_at_all(bpf_prefix: Prefix) -> None:
    start = bpf_prefix.run("start")
    assert start.returncode == 0 and "no scripts in" in start.stderr
    status = bpf_prefix.run("status")
    assert status.returncode == 3 and "No systemtap scripts are present" in status.stdout


def test_status_file_of_a_deleted_script_is_reported_and_stopped(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "gone")
    assert bpf_prefix.run("start").returncode == 0
    pid = pid_of(bpf_prefix, "gone")
    (bpf_prefix.scripts / "gone.stp").unlink()
    (bpf_prefix.root / "conf.d" / "gone.conf").unlink()
    status = bpf_prefix.run("status")
    assert status.returncode == 0 and f"gone({pid}) is running..." in status.stdout
    stop = bpf_prefix.run("stop")
    assert stop.returncode == 0 and "Stopped gone" in stop.stdout
    assert not process_alive(pid) and not (bpf_prefix.stat / "gone").exists()


def test_stop_finds_a_script_whose_runtime_was_changed_since_start(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "switched")
    assert bpf_prefix.run("start").returncode == 0
    pid = pid_of(bpf_prefix, "switched")
    bpf_prefix.configure("switched", options="")  # now a kernel-module script
    assert f"switched({pid}) is running..." in bpf_prefix.run("status").stdout
    stop = bpf_prefix.run("stop")
    assert stop.returncode == 0 and "Stopped switched" in stop.stdout
    assert not process_alive(pid)


def test_foreign_files_in_stat_path_are_never_taken_for_scripts(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "cron")
    (bpf_prefix.stat / "sshd.pid").write_text("4242\n")
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        ticks = Path(f"/proc/{bystander.pid}/stat").read_text()
        start_time = ticks[ticks.rfind(")") + 2 :].split()[19]
        # A forged record naming someone else's process.
        (bpf_prefix.stat / "cron").write_text(
            f"name=cron\nruntime=bpf\npid={bystander.pid}\nstart_time={start_time}\n"
            f"module={bpf_prefix.cache_dir() / 'cron.bo'}\n"
        )
        status = bpf_prefix.run("status")
        assert "sshd" not in status.stdout
        assert "cron is dead, but pidfile exists" in status.stdout
        assert bpf_prefix.run("stop").returncode == 0
        assert process_alive(bystander.pid)
        assert (bpf_prefix.stat / "sshd.pid").read_text() == "4242\n"
    finally:
        bystander.kill()
        bystander.wait()


def test_unwritable_status_file_fails_the_start_and_stops_the_script(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "ticker")
    (bpf_prefix.stat / "ticker").mkdir()  # the status file cannot be put in place
    done = bpf_prefix.run("start")
    assert done.returncode == 1
    assert "cannot write its status file" in done.stderr and "stopped it again" in done.stderr
    module = str(bpf_prefix.cache_dir() / "ticker.bo").encode()
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and module in _cmdline(p)]


def test_stop_works_despite_broken_requirements(bpf_prefix: Prefix) -> None:
    add_ticker(bpf_prefix, "a")
    add_ticker(bpf_prefix, "b", requires="a")
    assert bpf_prefix.run("start").returncode == 0
    pids = [pid_of(bpf_prefix, name) for name in ("a", "b")]
    bpf_prefix.configure(
        "b", options=f"--runtime=bpf -o {bpf_prefix.root / 'b.out'}", requires="a zzz"
    )
    bpf_prefix.configure("a", options=f"--runtime=bpf -o {bpf_prefix.root / 'a.out'}", requires="b")
    stop = bpf_prefix.run("stop")
    assert stop.returncode == 0, stop.stderr
    assert "b requires zzz, which is not a script; stopping anyway" in stop.stderr
    assert "dependency cycle" in stop.stderr
    assert not any(process_alive(pid) for pid in pids)
