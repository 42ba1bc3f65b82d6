"""``stap-server`` as a service: LSB exit codes and one-line errors."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.server.conftest import ServerFactory
from tests.server.helpers import STAP_SERVER, Server, ensure_service_user


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("stap-server: ")
    return proc.stderr


def _dead_pid() -> int:
    """A pid that names no process: that of a child which has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_lifecycle_and_status_codes(server_factory: ServerFactory) -> None:
    server = server_factory()
    stopped = server.command("status")
    assert (stopped.returncode, stopped.stdout.strip()) == (3, "stap-server is stopped")

    server.start()
    pid = server.pid()
    running = server.command("status")
    assert running.returncode == 0
    assert f"(pid {pid}) is running" in running.stdout

    again = server.command("start")  # already running: success, same process
    assert again.returncode == 0
    assert server.pid() == pid

    restarted = server.command("try-restart")
    assert restarted.returncode == 0, restarted.stderr
    assert server.pid() != pid
    assert server.get("/").status == 200

    stop = server.command("stop")
    assert stop.returncode == 0
    assert not server.pid_file.exists()
    assert server.command("status").returncode == 3
    assert server.command("stop").returncode == 0  # stopping a stopped server is fine


def test_condrestart_leaves_a_stopped_server_stopped(server_factory: ServerFactory) -> None:
    server = server_factory()
    for command in ("condrestart", "try-restart", "force-reload"):
        proc = server.command(command)
        assert proc.returncode == 0, proc.stderr
    assert server.command("status").returncode == 3


def test_stale_pid_file_reads_as_dead(server_factory: ServerFactory) -> None:
    server = server_factory()
    server.pid_file.parent.mkdir()
    server.pid_file.write_text(f"{_dead_pid()}\n")
    dead = server.command("status")
    assert dead.returncode == 1
    assert "dead" in dead.stdout
    assert server.command("stop").returncode == 0
    assert server.command("status").returncode == 3


def test_restart_from_stopped_starts(server_factory: ServerFactory) -> None:
    server = server_factory()
    proc = server.command("restart")
    assert proc.returncode == 0, proc.stderr
    assert server.command("status").returncode == 0


def test_bad_config_value_exits_6_naming_the_line(server_factory: ServerFactory) -> None:
    server = server_factory(MAX_COMPILES="lots")
    proc = server.command("start")
    assert proc.returncode == 6
    message = _one_line_error(proc)
    assert f"{server.conf}:" in message
    assert "MAX_COMPILES" in message


def test_config_with_a_command_is_rejected(server_factory: ServerFactory) -> None:
    server = server_factory()
    server.conf.write_text(server.conf.read_text() + "touch /tmp/stap-server-pwned\n")
    proc = server.command("status")
    assert proc.returncode == 6
    assert "not an assignment" in _one_line_error(proc)


def test_unknown_setting_and_missing_config(server_factory: ServerFactory) -> None:
    server = server_factory(PROT="1")
    assert "unknown setting PROT" in _one_line_error(server.command("status"))
    server.conf.unlink()
    proc = server.command("status")
    assert proc.returncode == 6
    assert "cannot read config file" in _one_line_error(proc)


def test_usage_error_is_one_line_exit_2() -> None:
    proc = subprocess.run(
        [str(STAP_SERVER), "reload-everything"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    _one_line_error(proc)


def test_missing_service_user_refuses_root(server_factory: ServerFactory) -> None:
    server = server_factory(USER="no-such-stap-user")
    proc = server.command("start")
    assert proc.returncode == 5
    assert "service user 'no-such-stap-user' does not exist" in _one_line_error(proc)


def test_port_in_use_is_a_clear_failure(
    server_factory: ServerFactory, shared_server: Server
) -> None:
    server = server_factory(PORT=str(shared_server.port))
    proc = server.command("start")
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{shared_server.port}" in _one_line_error(proc)
    assert server.command("status").returncode == 3


def test_unsupported_configured_release(server_factory: ServerFactory) -> None:
    server = server_factory(RELEASES="0.0.1-nowhere")
    proc = server.command("start")
    assert proc.returncode == 6
    assert "0.0.1-nowhere" in _one_line_error(proc)


def test_root_as_service_user_is_refused(server_factory: ServerFactory) -> None:
    server = server_factory(USER="root")
    for extra in ((), ("--allow-root",)):
        proc = server.command(*extra, "start")
        assert proc.returncode == 6
        assert "USER=root is root" in _one_line_error(proc)
    assert server.command("status").returncode == 3


@pytest.mark.parametrize(
    ("setting", "below"),
    [
        ("STATE_DIR", "state"),
        ("LOG_FILE", "stap-server.log"),
        ("LOG_FILE", "log/stap-server.log"),
        ("PID_FILE", "run/stap-server.pid"),
    ],
)
def test_path_below_a_plain_file_is_a_one_line_error(
    server_factory: ServerFactory, setting: str, below: str
) -> None:
    server = server_factory()
    plain = server.root / "plain-file"
    plain.write_text("")
    server.settings[setting] = str(plain / below)
    server.write_config()
    proc = server.command("start")
    assert proc.returncode == 6
    message = _one_line_error(proc)
    assert f"{setting} {plain}" in message, message
    assert message.rstrip().endswith(("Not a directory", "not a directory"))


def test_stale_compile_directories_are_removed_at_start(server_factory: ServerFactory) -> None:
    user = ensure_service_user()
    server = server_factory()
    tmp = server.state_dir / "tmp"
    leftover = tmp / "stap-k1ll3d"
    (leftover / "build").mkdir(parents=True)
    (leftover / "build" / "stap_1_src.c").write_text("/* from a server that was killed */\n")
    for path in [tmp, *tmp.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    server.start()
    assert not leftover.exists()
    assert f"removed 1 compile directories left in {tmp}" in server.log_text()
