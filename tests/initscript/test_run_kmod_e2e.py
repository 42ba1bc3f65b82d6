"""The kernel-module runtime's command lines, against stand-in stap/staprun.

The module runtime cannot be built or loaded on these machines, so stand-ins
that keep staprun's command-line contract record what the service runs, and
a file plays /proc/modules (MODULES_LIST).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

from tests.initscript.conftest import FakeTools
from tests.support.prefix import COMMAND, RELEASE, SUPPORT, Prefix, process_alive, wait_for

SCRIPT = "probe begin { }\n"


def wrapped_staprun(directory: Path, prelude: str) -> Path:
    """A staprun that runs shell ``prelude`` before handing over to the stand-in."""
    real = SUPPORT / "fake_staprun.py"
    wrapper = directory / "wrapped-staprun"
    wrapper.write_text(f'#!/bin/sh\n{prelude}\nexec {real} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper


def module(prefix: Prefix, name: str) -> str:
    return str(prefix.cache_dir(RELEASE) / f"{name}.ko")


def test_memory_flight_recorder_is_staprun_L(kmod_prefix: Prefix, fake_tools: FakeTools) -> None:
    kmod_prefix.add_script("mem", SCRIPT, options="-v -s 8 -DX=1 -g -x 77")
    done = kmod_prefix.run("start")
    assert done.returncode == 0, done.stderr
    assert fake_tools.calls_of("staprun") == [
        ["-L", "-b", "8", "-x", "77", module(kmod_prefix, "mem")]
    ]
    assert fake_tools.loaded() == ["mem"]
    status = kmod_prefix.run("status")
    assert status.returncode == 0 and "mem is running..." in status.stdout
    assert kmod_prefix.run("stop").returncode == 0
    assert fake_tools.calls_of("staprun")[-1] == ["-d", "mem"]
    assert fake_tools.loaded() == []
    assert kmod_prefix.run("status").returncode == 3


def test_file_flight_recorder_is_staprun_D(kmod_prefix: Prefix, fake_tools: FakeTools) -> None:
    out = kmod_prefix.root / "rec.out"
    kmod_prefix.add_script("rec", SCRIPT, options=f"-o {out} -S 2,4 -s 16 -c 'sleep 1' -I /x")
    done = kmod_prefix.run("start")
    assert done.returncode == 0, done.stderr
    assert fake_tools.calls_of("staprun") == [
        ["-D", "-o", str(out), "-S", "2,4", "-b", "16", "-c", "sleep 1", module(kmod_prefix, "rec")]
    ]
    pid = kmod_prefix.status_json()["rec"]["pid"]
    assert isinstance(pid, int) and process_alive(pid)
    assert f"rec({pid}) is running..." in kmod_prefix.run("status").stdout
    assert wait_for(lambda: out.exists() and "tick 2" in out.read_text())
    stop = kmod_prefix.run("stop", "rec")
    assert stop.returncode == 0, stop.stderr
    # The daemon got SIGTERM and unloaded; no staprun -d was needed.
    assert [c for c in fake_tools.calls_of("staprun") if c[0] == "-d"] == []
    assert not process_alive(pid) and fake_tools.loaded() == []


def test_module_loaded_by_someone_else(kmod_prefix: Prefix, fake_tools: FakeTools) -> None:
    kmod_prefix.add_script("mine", SCRIPT)
    fake_tools.modules.write_text("mine 16384 0 - Live 0x0\n")
    status = kmod_prefix.run("status")
    assert status.returncode == 1
    assert "mine is dead, but another script is running." in status.stdout
    start = kmod_prefix.run("start")
    assert start.returncode == 0 and "mine is already running" in start.stdout
    assert fake_tools.calls_of("staprun") == []


def test_dead_daemon_with_status_file(kmod_prefix: Prefix, fake_tools: FakeTools) -> None:
    out = kmod_prefix.root / "d.out"
    kmod_prefix.add_script("d", SCRIPT, options=f"-o {out}")
    assert kmod_prefix.run("start").returncode == 0
    pid = kmod_prefix.status_json()["d"]["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)  # dies without unloading ...
    fake_tools.modules.write_text("")  # ... and the module goes away with it
    assert wait_for(lambda: not process_alive(pid))
    status = kmod_prefix.run("status")
    assert status.returncode == 1 and "d is dead, but pidfile exists" in status.stdout
    assert kmod_prefix.run("stop").returncode == 0
    assert not (kmod_prefix.stat / "d").exists()


def test_module_that_will_not_unload_fails_the_stop(
    kmod_prefix: Prefix, fake_tools: FakeTools, tmp_path: Path
) -> None:
    stubborn = wrapped_staprun(tmp_path, 'if [ "$1" = "-d" ]; then exit 0; fi')
    kmod_prefix.write_config(STAPRUN=str(stubborn), STOP_TIMEOUT="0.5")
    kmod_prefix.add_script("sticky", SCRIPT)
    assert kmod_prefix.run("start").returncode == 0
    stop = kmod_prefix.run("stop")
    assert stop.returncode == 1
    assert "Failed to stop sticky: module sticky is still loaded after 0.5s" in stop.stderr
    # The status file still tells the truth: it runs.
    assert (kmod_prefix.stat / "sticky").exists()
    assert kmod_prefix.status_json()["sticky"]["state"] == "running"


def test_loader_failure_and_bad_buffer_size(kmod_prefix: Prefix, fake_tools: FakeTools) -> None:
    kmod_prefix.add_script("big", SCRIPT, options="-s 5000")
    done = kmod_prefix.run("start")
    assert done.returncode == 1
    assert "big_OPT: -s 5000: buffer size must be a number of MB from 1 to 4095" in done.stderr
    assert fake_tools.calls_of("staprun") == [] and fake_tools.loaded() == []


def test_autocompile_no_with_stale_cache(kmod_prefix: Prefix, fake_tools: FakeTools) -> None:
    kmod_prefix.add_script("late", SCRIPT)
    kmod_prefix.write_config(AUTOCOMPILE="no")
    done = kmod_prefix.run("start")
    assert done.returncode == 1 and "no valid cache for late" in done.stderr
    assert fake_tools.calls_of("stap") == [] and fake_tools.loaded() == []


def test_cache_only_script(kmod_prefix: Prefix, fake_tools: FakeTools) -> None:
    kmod_prefix.add_script("shipped", SCRIPT)
    assert kmod_prefix.run("compile").returncode == 0
    (kmod_prefix.scripts / "shipped.stp").unlink()
    kmod_prefix.write_config(AUTOCOMPILE="no")
    assert "No systemtap scripts are present" in kmod_prefix.run("status").stdout
    assert kmod_prefix.run("start").returncode == 0  # no scripts: nothing to do
    assert fake_tools.loaded() == []
    kmod_prefix.write_config(ALLOW_CACHEONLY="yes")
    done = kmod_prefix.run("start")
    assert done.returncode == 0, done.stderr
    assert fake_tools.loaded() == ["shipped"]
    assert kmod_prefix.run("stop").returncode == 0


def test_sigterm_during_start_leaves_no_unrecorded_module(
    kmod_prefix: Prefix, fake_tools: FakeTools, tmp_path: Path
) -> None:
    slow = wrapped_staprun(tmp_path, "sleep 2")  # a window to interrupt the rest in
    kmod_prefix.write_config(STAPRUN=str(slow))
    for name in ("m1", "m2", "m3", "m4"):
        kmod_prefix.add_script(name, SCRIPT)
    assert kmod_prefix.run("compile").returncode == 0
    command = [COMMAND, "start", "-c", str(kmod_prefix.config)]
    env = {**os.environ, **fake_tools.env}
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as run:
        assert wait_for(lambda: len(fake_tools.loaded()) >= 1)
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=30)
    assert run.returncode == 130
    assert "interrupted" in stderr
    loaded = fake_tools.loaded()
    recorded = sorted(p.name for p in kmod_prefix.stat.iterdir() if not p.name.startswith("."))
    assert 1 <= len(loaded) < 4
    assert sorted(loaded) == recorded


def test_dead_daemon_of_a_loaded_module_shows_no_pid(
    kmod_prefix: Prefix, fake_tools: FakeTools
) -> None:
    out = kmod_prefix.root / "r.out"
    kmod_prefix.add_script("r", SCRIPT, options=f"-o {out}")
    assert kmod_prefix.run("start").returncode == 0
    pid = kmod_prefix.status_json()["r"]["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)  # the module stays listed
    assert wait_for(lambda: not process_alive(pid))
    status = kmod_prefix.run("status")
    assert "r is running..." in status.stdout and str(pid) not in status.stdout
    assert kmod_prefix.run("stop").returncode == 0
    assert fake_tools.loaded() == []
