"""Start-up pieces: which releases are served, the foreground mode, the systemd unit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stapinit.server.daemon import installed_releases
from tests.server.conftest import ServerFactory
from tests.server.helpers import STAP_SERVER, ensure_service_user

UNIT = Path(__file__).resolve().parents[2] / "data" / "server" / "stap-server.service"


def test_installed_releases_need_a_build_tree(tmp_path: Path) -> None:
    for release, has_config in (("6.1.0-1", True), ("5.10.0-2", True), ("4.19.0-3", False)):
        build = tmp_path / release / "build"
        build.mkdir(parents=True)
        if has_config:
            (build / ".config").write_text("CONFIG_X=y\n")
    (tmp_path / "stray-file").write_text("")
    assert installed_releases(tmp_path) == ("5.10.0-2", "6.1.0-1")
    assert installed_releases(tmp_path / "missing") == ()


def test_foreground_run_as_the_service_user(server_factory: ServerFactory) -> None:
    """What the systemd unit does: ``run`` as stap-server, stopped by SIGTERM."""
    user = ensure_service_user()
    server = server_factory()
    for directory in (server.state_dir, server.log_file.parent, server.pid_file.parent):
        directory.mkdir()
        os.chown(directory, user.pw_uid, user.pw_gid)
    proc = subprocess.Popen(
        [str(STAP_SERVER), "-c", str(server.conf), "run"],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not server.pid_file.exists() or not server.cert_path.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert server.pid() == proc.pid
        assert server.command("status").returncode == 0
        assert server.get("/").status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, err = proc.communicate()
    assert err == b""
    assert not server.pid_file.exists()
    assert "stopped" in server.log_text()


def test_systemd_unit_is_valid_and_unprivileged(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "\nUser=stap-server\n" in text
    assert " run\n" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "stap-server.service"
    unit.write_text(text.replace("/usr/bin/stap-server", str(STAP_SERVER)))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "stap-server.service" not in proc.stderr, proc.stderr
