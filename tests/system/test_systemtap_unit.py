"""systemtap.service under real systemd: what an administrator does and sees.

The machine (see conftest) has ticker and counter (counter requires ticker),
both real BPF scripts compiled by the real stap inside, enabled through
systemtap.service, and rebooted. Each test leaves the unit active with both
scripts running.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import pytest

from tests.system.conftest import OUTPUT, SCRIPTS, wait_until
from tests.system.container import Container

pytestmark = [pytest.mark.system, pytest.mark.xdist_group("system")]
UNIT = "systemtap.service"


def systemctl(machine: Container, verb: str) -> None:
    """``systemctl VERB systemtap.service``, as often as the tests need.

    systemd refuses a sixth start within ten seconds ("Start request repeated
    too quickly"); an administrator resets that with ``reset-failed``, and so
    do the tests, which restart far more often than anyone would.
    """
    machine.check("systemctl", "reset-failed", UNIT)
    machine.check("systemctl", verb, UNIT)


def pids(machine: Container) -> dict[str, int]:
    """``systemtap-service status``'s running scripts and their pids."""
    text = machine.run("systemtap-service", "status").stdout
    return {name: int(pid) for name, pid in re.findall(r"^(\w+)\((\d+)\) is running", text, re.M)}


def unit_state(machine: Container) -> str:
    return machine.run("systemctl", "show", "-P", "ActiveState", UNIT).stdout.strip()


def status_text(machine: Container) -> str:
    return machine.run("systemctl", "show", "-P", "StatusText", UNIT).stdout.strip()


def monotonic_entered(machine: Container, unit: str) -> int:
    stamp = machine.run("systemctl", "show", "-P", "ActiveEnterTimestampMonotonic", unit)
    return int(stamp.stdout.strip())


def stapbpf_alive(machine: Container, pid: int) -> bool:
    comm = machine.run("cat", f"/proc/{pid}/comm")
    stat = machine.run("cat", f"/proc/{pid}/stat").stdout
    return comm.returncode == 0 and comm.stdout.strip() == "stapbpf" and ") Z " not in stat


@pytest.fixture
def scripts_running(machine: Container) -> Iterator[Callable[[], dict[str, int]]]:
    """Afterwards the unit is active with both scripts running, whatever the test did."""

    def healthy() -> dict[str, int]:
        running = pids(machine)
        assert set(running) == {"ticker", "counter"}, running
        assert unit_state(machine) == "active"
        return running

    yield healthy
    if unit_state(machine) != "active" or set(pids(machine)) != {"ticker", "counter"}:
        systemctl(machine, "restart")


def test_boot_starts_the_scripts_before_sysinit_and_reports_them(machine: Container) -> None:
    assert machine.run("systemctl", "is-system-running").stdout.strip() == "running"
    running = pids(machine)
    assert set(running) == {"ticker", "counter"}
    assert all(stapbpf_alive(machine, pid) for pid in running.values())
    # Before sysinit.target, hence before every ordinary service.
    assert monotonic_entered(machine, UNIT) <= monotonic_entered(machine, "sysinit.target")
    assert monotonic_entered(machine, UNIT) <= monotonic_entered(machine, "tracee.service")
    # The BPF programs really run: ticks reach the output file.
    wait_until(
        "ticks in ticker.out", lambda: "tick" in machine.path(f"{OUTPUT}/ticker.out").read_text()
    )
    shown = machine.run("systemctl", "status", UNIT)
    assert shown.returncode == 0, shown.stdout
    assert "active (running)" in shown.stdout
    assert (
        f"2 scripts running: counter (pid {running['counter']}), ticker (pid {running['ticker']})"
        in shown.stdout
    )


def test_systemctl_stop_start_restart_act_on_the_scripts(
    machine: Container, scripts_running: Callable[[], dict[str, int]]
) -> None:
    before = scripts_running()

    machine.check("systemctl", "stop", UNIT)
    assert unit_state(machine) == "inactive"
    assert machine.run("systemctl", "is-failed", UNIT).returncode != 0
    assert not any(stapbpf_alive(machine, pid) for pid in before.values())
    stopped = machine.run("systemtap-service", "status")
    assert stopped.returncode == 3, stopped.stdout
    assert "counter is stopped" in stopped.stdout and "ticker is stopped" in stopped.stdout
    # Stopped in order, dependents first, each running its end probe.
    assert "ticker stopped after" in machine.path(f"{OUTPUT}/ticker.out").read_text()
    assert "counter stopped" in machine.path(f"{OUTPUT}/counter.out").read_text()
    shown = machine.run("systemctl", "status", UNIT)
    assert shown.returncode == 3 and "inactive (dead)" in shown.stdout

    systemctl(machine, "start")
    started = scripts_running()
    assert not set(started.values()) & set(before.values())

    systemctl(machine, "restart")
    restarted = scripts_running()
    assert not set(restarted.values()) & set(started.values())
    assert not any(stapbpf_alive(machine, pid) for pid in started.values())


def test_reload_restarts_the_scripts_and_the_unit_stays_active(
    machine: Container, scripts_running: Callable[[], dict[str, int]]
) -> None:
    before = scripts_running()
    main_pid = machine.run("systemctl", "show", "-P", "MainPID", UNIT).stdout.strip()
    machine.check("systemctl", "reload", UNIT)
    after = scripts_running()
    assert not set(after.values()) & set(before.values())
    # The same watcher goes on: a reload's stop is no death.
    time.sleep(3)  # more than the watcher's scan interval
    assert machine.run("systemctl", "show", "-P", "MainPID", UNIT).stdout.strip() == main_pid
    assert unit_state(machine) == "active"
    wait_until(
        "status names the new pids",
        lambda: f"ticker (pid {after['ticker']})" in status_text(machine),
    )


@pytest.mark.parametrize(
    "status_command", [["systemctl", "status", UNIT], ["service", "systemtap", "status"]]
)
def test_a_killed_script_fails_the_unit_and_status_says_so(
    machine: Container, scripts_running: Callable[[], dict[str, int]], status_command: list[str]
) -> None:
    # Started by the unit's own process, whose children they are: it knows how they end.
    systemctl(machine, "restart")
    running = scripts_running()
    assert machine.run(*status_command).returncode == 0

    machine.check("kill", "-KILL", str(running["counter"]))

    wait_until("the unit fails", lambda: unit_state(machine) == "failed")
    shown = machine.run(*status_command)
    assert shown.returncode == 3, shown.stdout
    assert "Active: failed" in shown.stdout
    assert 'Status: "counter died (killed by SIGKILL)"' in shown.stdout, shown.stdout
    # A failed unit keeps nothing running: the other script was stopped too.
    assert not stapbpf_alive(machine, running["ticker"])
    assert machine.run("systemtap-service", "status").returncode == 3
    journal = machine.run("journalctl", "-b", "-u", UNIT, "-o", "cat").stdout
    assert "counter died (killed by SIGKILL)" in journal

    systemctl(machine, "restart")
    scripts_running()
    assert machine.run(*status_command).returncode == 0


def test_scripts_stopped_by_hand_are_no_failure(
    machine: Container, scripts_running: Callable[[], dict[str, int]]
) -> None:
    running = scripts_running()
    machine.check("systemtap-service", "stop", "counter")
    wait_until(
        "status shows one script",
        lambda: status_text(machine) == f"1 script running: ticker (pid {running['ticker']})",
    )
    assert unit_state(machine) == "active"

    machine.check("systemtap-service", "stop")
    wait_until("the unit ends", lambda: unit_state(machine) == "inactive")
    assert machine.run("systemctl", "is-failed", UNIT).returncode != 0
    assert machine.run("service", "systemtap", "status").returncode == 3


def test_a_script_that_finishes_is_no_failure(
    machine: Container, scripts_running: Callable[[], dict[str, int]]
) -> None:
    scripts_running()
    machine.path(f"{SCRIPTS}/once.stp").write_text(
        'probe timer.s(2) { printf("done\\n"); exit() }\n'
    )
    conf = machine.path("/etc/systemtap/conf.d/once.conf")
    conf.write_text(f'once_OPT="--runtime=bpf -o {OUTPUT}/once.out"\n')
    try:
        systemctl(machine, "restart")
        assert set(pids(machine)) == {"ticker", "counter", "once"}
        wait_until("once finishes", lambda: "once" not in pids(machine))
        assert machine.path(f"{OUTPUT}/once.out").read_text() == "done\n"
        time.sleep(3)  # more than the watcher's scan interval
        assert unit_state(machine) == "active"
        assert status_text(machine).startswith("2 scripts running: counter")
        # It finished: not dead, and the whole service is fine.
        once = machine.run("systemtap-service", "status", "once")
        assert (once.returncode, once.stdout) == (0, "once ran and exited (status 0)\n")
        assert machine.run("service", "systemtap", "status").returncode == 0
        journal = machine.run("journalctl", "-b", "-u", UNIT, "-o", "cat").stdout
        assert "once ran and exited (status 0)" in journal
    finally:
        machine.path(f"{SCRIPTS}/once.stp").unlink()
        conf.unlink()
    systemctl(machine, "restart")


def test_shutdown_stops_the_scripts_after_ordinary_services(
    machine: Container, scripts_running: Callable[[], dict[str, int]]
) -> None:
    scripts_running()
    record = machine.path(f"{OUTPUT}/status-when-tracee-stopped")
    record.unlink(missing_ok=True)
    machine.poweroff()
    # When the ordinary service stopped, both scripts still ran...
    text = record.read_text()
    assert re.search(r"^counter\(\d+\) is running", text, re.M), text
    assert re.search(r"^ticker\(\d+\) is running", text, re.M), text
    # ...and then they were stopped properly (their end probes ran).
    assert "ticker stopped after" in machine.path(f"{OUTPUT}/ticker.out").read_text()
    assert "counter stopped" in machine.path(f"{OUTPUT}/counter.out").read_text()
    machine.boot()
    scripts_running()
