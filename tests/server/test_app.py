"""Pieces of the request path that need no network: slots, locks, logging, masking."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from stapinit.protocol import CompileRequest, CompileResponse, Tapset
from stapinit.server.app import CompileSlots, InFlight, request_log_fields
from stapinit.server.compiler import MAX_OUTPUT, TRUNCATED, mask_paths, read_capped
from stapinit.server.httpd import format_fields
from stapinit.server.policy import parse_compile_options


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


def test_queue_places_count_against_the_queue() -> None:
    slots = CompileSlots(workers=1, queue_size=1)
    assert slots.acquire(timeout=1)
    assert slots.enter_queue()  # an identical request waiting for the running compile
    assert not slots.enter_queue()  # queue full
    assert not slots.acquire(timeout=5)  # refused at once, not after 5 s
    slots.leave_queue()
    assert slots.waiting == 0
    assert slots.enter_queue()
    slots.leave_queue()
    slots.release()


def test_in_flight_has_one_leader_per_key() -> None:
    flights = InFlight()
    first, leads = flights.join("a")
    assert leads
    second, leads_too = flights.join("a")
    assert second is first and not leads_too
    _, other_leads = flights.join("b")
    assert other_leads
    failed = CompileResponse(1, "", "semantic error\n")
    flights.land("a", first, failed)
    assert first.done.is_set() and first.response == failed
    fresh, leads_again = flights.join("a")  # a later request compiles anew
    assert leads_again and fresh is not first


def test_log_fields_hash_script_and_tapsets() -> None:
    req = CompileRequest("probe begin {}", "r1", "x86_64", eval=True, options=("-v", "--bpf"))
    fields = request_log_fields(req, parse_compile_options(req.options, False, req.runtime).runtime)
    assert fields["options"] == "-v --bpf"
    assert fields["runtime"] == "bpf"  # what the policy found, not the request's field
    assert "runtime" not in request_log_fields(req)  # refused before the options were read
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


def test_output_is_kept_up_to_the_cap_and_drained() -> None:
    # 3 MiB on stdout: kept to MAX_OUTPUT, the rest read and dropped so the writer ends.
    proc = subprocess.Popen(
        ["sh", "-c", "head -c 3145728 /dev/zero; echo done >&2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    with proc.stdout, proc.stderr:
        (out, err), timed_out = read_capped(
            [proc.stdout, proc.stderr], time.monotonic() + 30, proc.kill
        )
    assert proc.wait(5) == 0
    assert not timed_out
    assert len(out.data) == MAX_OUTPUT
    assert out.text().endswith(TRUNCATED)
    assert err.text() == "done\n"


def test_output_reading_stops_at_the_deadline() -> None:
    proc = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    started = time.monotonic()
    with proc.stdout, proc.stderr:
        _, timed_out = read_capped([proc.stdout, proc.stderr], started + 0.3, proc.kill)
    assert timed_out
    assert proc.wait(5) == -9
    assert time.monotonic() - started < 3
