"""A trusted but hostile COMPILE_SERVER against root's systemtap-service: it may fail the
compile, never hold the service (and its lock) past COMPILE_TIMEOUT or a SIGTERM, flood
its log, or get a file of its choosing into the cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stapinit.initscript.log import MAX_LOGGED_OUTPUT, clip_output
from tests.support.hostile_server import HostileServer, hostile_server, send_json, trickle
from tests.support.prefix import COMMAND, Prefix, wait_for

BIN = Path(sys.executable).parent


def failed_with_output(stdout: str) -> bytes:
    answer = {"status": 1, "stdout": stdout, "stderr": "x", "module": None, "signature": None}
    return json.dumps({**answer, "cached": False}).encode()


def serve_to(prefix: Prefix, server: HostileServer, timeout: str) -> dict[str, str]:
    """Point ``prefix`` at ``server``, trusted in a private trust root; the env to run with."""
    trust_root = prefix.root / "trust"
    trust_root.mkdir(exist_ok=True)
    env = {"STAP_TRUST_ROOT": str(trust_root)}
    done = subprocess.run(
        [str(BIN / "stap-authorize-server-cert"), str(server.cert_path)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    prefix.write_config(COMPILE_SERVER=str(server.address), COMPILE_TIMEOUT=timeout)
    prefix.add_script("tick", 'probe begin { println("hi") exit() }', "--runtime=bpf")
    return env


def test_compile_timeout_bounds_a_trickling_servers_whole_answer(
    kmod_prefix: Prefix, tmp_path: Path
) -> None:
    with hostile_server(tmp_path, lambda tls, stop: trickle(tls, stop, 0.3)) as server:
        env = serve_to(kmod_prefix, server, "2")
        began = time.monotonic()
        done = kmod_prefix.run("compile", "-y", env=env, timeout=60)
        took = time.monotonic() - began
    assert done.returncode != 0
    assert f"Failed to compile tick: server {server.address} did not answer within 2 s" in (
        done.stderr
    )
    assert took < 15


def test_sigterm_ends_a_remote_compile_at_once_and_frees_the_lock(
    kmod_prefix: Prefix, tmp_path: Path
) -> None:
    with hostile_server(tmp_path, trickle) as server:
        env = serve_to(kmod_prefix, server, "600")
        proc = subprocess.Popen(
            [COMMAND, "compile", "-y", "-c", str(kmod_prefix.config)],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert wait_for(lambda: server.requests > 0, 20)
            time.sleep(0.5)  # well into the wait for the answer
            proc.send_signal(signal.SIGTERM)
            began = time.monotonic()
            _out, err = proc.communicate(timeout=10)
            took = time.monotonic() - began
        finally:
            proc.kill()
            proc.wait()
        assert took < 3
        assert proc.returncode == 130
        assert "interrupted" in err
        # The lock went with it: the next command does not wait for it.
        again = kmod_prefix.run("status", env={**env, "LOCK_TIMEOUT": "1"}, timeout=30)
        assert "lock" not in again.stderr.lower(), again.stderr


def test_a_servers_flood_of_output_is_clipped_in_the_log(
    kmod_prefix: Prefix, tmp_path: Path
) -> None:
    # 1,000,000 characters of "output": what a real server may send (its 1 MiB bound).
    flood = failed_with_output(("A" * 99 + "\n") * 10_000)
    with hostile_server(tmp_path, lambda tls, _s: send_json(tls, flood)) as server:
        env = serve_to(kmod_prefix, server, "30")
        done = kmod_prefix.run("compile", "-y", env=env, timeout=60)
    assert done.returncode != 0
    log = kmod_prefix.log()
    assert "characters of output left out ...]" in log
    assert len(log) < 2 * MAX_LOGGED_OUTPUT + 64 * 1024


def test_output_over_what_a_server_may_send_is_refused(kmod_prefix: Prefix, tmp_path: Path) -> None:
    flood = failed_with_output("A" * (8 * 1024 * 1024))
    with hostile_server(tmp_path, lambda tls, _s: send_json(tls, flood)) as server:
        env = serve_to(kmod_prefix, server, "30")
        done = kmod_prefix.run("compile", "-y", env=env, timeout=60)
    assert done.returncode != 0
    assert "stap's output over" in done.stderr
    assert kmod_prefix.log_file.stat().st_size < 64 * 1024


@pytest.mark.parametrize("name", ["Makefile", "tick.ko", "other.bo"])
def test_only_the_scripts_own_module_name_is_accepted(
    kmod_prefix: Prefix, tmp_path: Path, name: str
) -> None:
    body = json.dumps(
        {
            "status": 0,
            "stdout": "",
            "stderr": "",
            "module": {"name": name, "data": "AAAA"},
            "signature": "AAAA",
            "cached": False,
        }
    ).encode()
    with hostile_server(tmp_path, lambda tls, _s: send_json(tls, body)) as server:
        env = serve_to(kmod_prefix, server, "30")
        done = kmod_prefix.run("compile", "-y", env=env, timeout=60)
    assert done.returncode != 0
    assert f"server {server.address}: the server sent {name}, not tick.bo" in done.stderr
    cache = kmod_prefix.cache_dir()
    assert not cache.exists() or list(cache.iterdir()) == []


def test_clip_output_keeps_both_ends_and_says_what_it_left_out() -> None:
    text = "head\n" + "x" * 100 + "\ntail"
    assert clip_output(text, 200) == text
    clipped = clip_output(text, 20)
    note = "[... 90 characters of output left out ...]"
    assert clipped == f"head\nxxxxx\n{note}\nxxxxx\ntail"
