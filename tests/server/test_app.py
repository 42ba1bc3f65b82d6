"""Pieces of the request path that need no network: slots, locks, logging, masking."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from stapinit.protocol import CompileRequest, Tapset
from stapinit.server.app import CompileSlots, KeyedLocks, request_log_fields
from stapinit.server.compiler import mask_paths
from stapinit.server.httpd import format_fields


def test_slots_run_wait_and_refuse() -> None:
    slots = CompileSlots(workers=1, queue_size=1)
    assert slots.acquire(timeout=1)
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(slots.acquire(timeout=5)))
    waiter.start()
    deadline = time.monotonic() + 5
    while slots.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slots.waiting == 1
    assert not slots.acquire(timeout=5)  # queue full: refused at once
    slots.release()
    waiter.join(5)
    assert results == [True]
    assert (slots.running, slots.waiting) == (1, 0)
    slots.release()


def test_slot_wait_times_out() -> None:
    slots = CompileSlots(workers=1, queue_size=4)
    assert slots.acquire(timeout=1)
    started = time.monotonic()
    assert not slots.acquire(timeout=0.2)
    assert time.monotonic() - started >= 0.2
    assert slots.waiting == 0


def test_keyed_locks_serialise_one_key_only() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    with locks.hold("a"):
        other = threading.Thread(target=lambda: _hold(locks, "b", order))
        other.start()
        other.join(5)
        same = threading.Thread(target=lambda: _hold(locks, "a", order))
        same.start()
        time.sleep(0.1)
        order.append("first a done")
    same.join(5)
    assert order == ["b", "first a done", "a"]
    assert locks._locks == {}  # nothing kept once unused


def _hold(locks: KeyedLocks, key: str, order: list[str]) -> None:
    with locks.hold(key):
        order.append(key)


def test_log_fields_hash_script_and_tapsets() -> None:
    req = CompileRequest("probe begin {}", "r1", "x86_64", eval=True, options=("-v", "--bpf"))
    fields = request_log_fields(req)
    assert fields["options"] == "-v --bpf"
    assert fields["runtime"] == "bpf"
    assert fields["script"].startswith("sha256:")
    with_tapset = CompileRequest(
        "probe begin {}", "r1", "x86_64", eval=True, tapsets=(Tapset("a.stp", "x"),)
    )
    assert request_log_fields(with_tapset)["script"] != fields["script"]
    assert request_log_fields(CompileRequest("x", "r", "a", eval=True))["options"] == "-"


def test_log_lines_stay_single_lines() -> None:
    line = format_fields({"a": "plain", "b": "two words", "c": 'say "hi"\nthere', "d": ""})
    assert line == 'a=plain b="two words" c="say \\"hi\\"\\nthere" d=""'


def test_temp_paths_are_masked() -> None:
    workdir = Path("/var/lib/stap-server/tmp/stap-abc123")
    text = f"error at {workdir}/tapsets/a.stp:1:2 and {workdir}/build\n"
    assert mask_paths(text, workdir) == "error at <tmpdir>/tapsets/a.stp:1:2 and <tmpdir>/build\n"
