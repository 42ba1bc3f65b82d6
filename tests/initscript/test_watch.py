"""``systemtap-service watch``: the verdicts (pure), sd_notify, and the command with real stapbpf.

Under real systemd the same command runs in tests/system.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from stapinit.core.runtime import State
from stapinit.initscript.watch import (
    Ended,
    Observation,
    judge,
    notify_address,
    sd_notify,
)
from tests.initscript.conftest import FakeTools
from tests.support.prefix import COMMAND, Prefix, process_alive, wait_for

TICK = 'global n\nprobe timer.ms(50) { n++ }\nprobe end { printf("end %d\\n", n) }\n'


def running(name: str, pid: int) -> Observation:
    return Observation(name, State.RUNNING, pid, None)


def gone(name: str, pid: int, ended: Ended | None) -> Observation:
    return Observation(name, State.DEAD, pid, ended)


# -- verdicts ---------------------------------------------------------------------


def test_all_running_keeps_watching_and_lists_them_by_name() -> None:
    module = Observation("m", State.RUNNING, 0, None)
    starting = Observation("s", State.STARTING, 30, None)
    verdict = judge([running("b", 20), running("a", 10), module, starting])
    assert verdict.exit_code is None
    assert verdict.status == "4 scripts running: a (pid 10), b (pid 20), m, s (pid 30)"
    assert judge([running("a", 10)]).status == "1 script running: a (pid 10)"


def test_a_script_whose_status_file_went_was_stopped_not_killed() -> None:
    stopped = Observation("b", State.STOPPED, 0, None)
    verdict = judge([running("a", 10), stopped])
    assert (verdict.exit_code, verdict.status) == (None, "1 script running: a (pid 10)")
    assert judge([stopped]) == judge([])
    # Recorded as exited (by start, or by an earlier look): done, no failure.
    assert judge([Observation("once", State.EXITED, 11, None)]) == judge([])
    assert judge([]).exit_code == 0 and judge([]).status == "no scripts running"


def test_a_script_that_exited_with_status_0_finished() -> None:
    verdict = judge([running("a", 10), gone("once", 11, Ended(0, None))])
    assert verdict.exit_code is None and verdict.finished == ("once",)
    assert verdict.status == "1 script running: a (pid 10)" and verdict.deaths == ()
    last = judge([gone("once", 11, Ended(0, None))])
    assert (last.exit_code, last.finished) == (0, ("once",))


@pytest.mark.parametrize(
    ("ended", "how"),
    [
        (Ended(None, signal.SIGKILL), "killed by SIGKILL"),
        (Ended(1, None), "exit status 1"),
        (None, "no longer running"),  # not our child, or a kernel module unloaded
    ],
)
def test_any_other_end_is_a_death_that_fails_the_unit(ended: Ended | None, how: str) -> None:
    verdict = judge([running("a", 10), gone("b", 11, ended)])
    assert verdict.exit_code == 1
    assert verdict.status == f"b died ({how})"
    assert verdict.deaths == (f"b died ({how})",)


def test_every_death_is_named() -> None:
    verdict = judge([gone("b", 11, None), gone("a", 10, Ended(2, None))])
    assert verdict.status == "a died (exit status 2); b died (no longer running)"


def test_wait_statuses_of_real_children_decode() -> None:
    exited = subprocess.Popen(["sh", "-c", "exit 3"])
    killed = subprocess.Popen(["sleep", "30"])
    killed.kill()
    assert Ended.from_wait_status(os.waitpid(exited.pid, 0)[1]) == Ended(3, None)
    assert Ended.from_wait_status(os.waitpid(killed.pid, 0)[1]) == Ended(None, signal.SIGKILL)
    assert Ended(None, 64).describe() == "killed by SIGRTMAX"
    assert Ended(None, 200).describe() == "killed by signal 200"


# -- sd_notify --------------------------------------------------------------------


def test_notify_addresses() -> None:
    assert notify_address({"NOTIFY_SOCKET": "@sd/notify"}) == "\0sd/notify"
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, and its $NOTIFY_SOCKET value."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        name = f"stapinit-test-{os.getpid()}-{id(sock)}"
        sock.bind("\0" + name)
        sock.settimeout(60)
        yield sock, "@" + name


def test_sd_notify_sends_one_datagram(tmp_path: Path, listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    sd_notify(notify_address({"NOTIFY_SOCKET": address}), "READY=1\nSTATUS=ok")
    assert sock.recv(4096) == b"READY=1\nSTATUS=ok"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as by_path:
        by_path.bind(str(tmp_path / "notify"))
        sd_notify(str(tmp_path / "notify"), "STATUS=x")
        assert by_path.recv(4096) == b"STATUS=x"
    sd_notify(None, "READY=1")  # not under systemd: nothing to do
    with pytest.raises(OSError):
        sd_notify(str(tmp_path / "nobody"), "READY=1")


# -- the command, with real stap and stapbpf ----------------------------------------


def messages(sock: socket.socket) -> Iterator[str]:
    while True:
        yield sock.recv(4096).decode()


def start_watch(prefix: Prefix, address: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [COMMAND, "watch", "-c", str(prefix.config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **prefix.env, "NOTIFY_SOCKET": address},
    )


def pid_of(prefix: Prefix, name: str) -> int:
    pid = prefix.status_json()[name]["pid"]
    assert isinstance(pid, int)
    return pid


def finish(watcher: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = watcher.communicate(timeout=30)
    return watcher.returncode, out, err


@pytest.fixture
def two_tickers(bpf_prefix: Prefix) -> Prefix:
    bpf_prefix.add_script("a", TICK, options=f"--runtime=bpf -o {bpf_prefix.root / 'a.out'}")
    bpf_prefix.add_script(
        "b", TICK, options=f"--runtime=bpf -o {bpf_prefix.root / 'b.out'}", requires="a"
    )
    return bpf_prefix


def test_watch_reports_ready_then_fails_when_a_script_is_killed(
    two_tickers: Prefix, listener: tuple[socket.socket, str]
) -> None:
    sock, address = listener
    watcher = start_watch(two_tickers, address)
    try:
        ready = sock.recv(4096).decode()
        a, b = pid_of(two_tickers, "a"), pid_of(two_tickers, "b")
        assert ready == f"READY=1\nSTATUS=2 scripts running: a (pid {a}), b (pid {b})"
        # Ready means started: both stapbpf run, as children of the watcher.
        assert process_alive(a) and process_alive(b)
        os.kill(b, signal.SIGKILL)
        code, out, err = finish(watcher)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert code == 1
    assert sock.recv(4096) == b"STATUS=b died (killed by SIGKILL)"
    assert "b died (killed by SIGKILL)" in err
    assert "Started a" in out and "Started b" in out
    assert "ERROR: b died (killed by SIGKILL)" in two_tickers.log()
    # What is left is for the unit's stop; the dead one is reaped, not a zombie.
    assert process_alive(a) and not process_alive(b)
    assert two_tickers.run("status").returncode == 1


def test_watch_ends_cleanly_when_the_scripts_are_stopped(
    two_tickers: Prefix, listener: tuple[socket.socket, str]
) -> None:
    sock, address = listener
    watcher = start_watch(two_tickers, address)
    try:
        assert sock.recv(4096).startswith(b"READY=1\n")
        a = pid_of(two_tickers, "a")
        assert two_tickers.run("stop", "b").returncode == 0
        assert sock.recv(4096).decode() == f"STATUS=1 script running: a (pid {a})"
        assert watcher.poll() is None
        assert two_tickers.run("stop").returncode == 0
        code, _, err = finish(watcher)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert (code, err) == (0, "")
    assert sock.recv(4096) == b"STATUS=no scripts running"


def test_watch_survives_a_restart_and_a_script_that_finishes(
    two_tickers: Prefix, listener: tuple[socket.socket, str]
) -> None:
    sock, address = listener
    two_tickers.add_script(
        "once",
        'probe timer.ms(1500) { printf("done\\n"); exit() }\n',
        options=f"--runtime=bpf -o {two_tickers.root / 'once.out'}",
    )
    watcher = start_watch(two_tickers, address)
    try:
        assert sock.recv(4096).startswith(b"READY=1\nSTATUS=3 scripts running: ")
        a = pid_of(two_tickers, "a")
        assert wait_for(lambda: "done" in (two_tickers.root / "once.out").read_text())
        assert sock.recv(4096).startswith(b"STATUS=2 scripts running: a (pid ")
        # It finished: status says so, not that it is dead.
        once = two_tickers.status_json()["once"]
        assert (once["state"], once["exit_status"]) == ("exited", 0)
        # Another command restarts a and b: stopped, then running again, no death.
        assert two_tickers.run("restart", "a", "b").returncode == 0
        new_a = pid_of(two_tickers, "a")
        assert new_a != a
        assert wait_for(lambda: watcher.poll() is None and process_alive(new_a))
        watcher.send_signal(signal.SIGTERM)
        code, out, err = finish(watcher)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    # SIGTERM (systemd's, after ExecStop) ends the watcher, not the scripts.
    assert (code, err) == (0, "")
    assert "once ran and exited (status 0)" in out
    assert process_alive(new_a)
    assert two_tickers.run("stop").returncode == 0


def test_watch_fails_like_start(bpf_prefix: Prefix, listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    bpf_prefix.add_script("bad", "probe nonsense { }\n", options="--runtime=bpf")
    watcher = start_watch(bpf_prefix, address)
    code, _, err = finish(watcher)
    assert code == 1 and "bad" in err
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(4096)  # never READY=1: systemd sees the start fail


def test_watch_notices_an_unloaded_kernel_module(
    kmod_prefix: Prefix, fake_tools: FakeTools, listener: tuple[socket.socket, str]
) -> None:
    """A module loaded with staprun -L has no process: the watcher looks at MODULES_LIST."""
    sock, address = listener
    kmod_prefix.add_script("mem", "probe begin { }\n")
    watcher = start_watch(kmod_prefix, address)
    try:
        assert sock.recv(4096) == b"READY=1\nSTATUS=1 script running: mem"
        # Unloaded behind the service's back (rmmod, or the module exited).
        fake_tools.modules.write_text("")
        code, _, err = finish(watcher)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert code == 1 and "mem died (no longer running)" in err
