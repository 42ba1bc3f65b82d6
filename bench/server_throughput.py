"""stap-server throughput: requests per second and latency, cached and uncached.

Starts a real ``stap-server`` on loopback (as root it switches to the
``stap-server`` user, which must exist) and sends compile requests for a small
BPF script from 1, 4 and 16 concurrent clients.  Every request is a new TLS
connection, as the server closes each one after answering.  "uncached" sends a
different script each time, so each request runs the real ``stap -p4``;
"cached" repeats one script the server has already compiled.  Usage:

    .venv/bin/python bench/server_throughput.py [--clients 1,4,16]
        [--uncached 48] [--cached 400] [--workers 0]
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import os
import platform
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from stapinit.protocol import CompileRequest, decode_compile_response, encode_compile_request

COMMAND = str(Path(sys.executable).parent / "stap-server")
SCRIPT = "# request {n}\nglobal hits\nprobe timer.ms(100) {{ hits++; if (hits > 3) exit() }}\n"


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def compile_once(port: int, ctx: ssl.SSLContext, script: str) -> tuple[float, bool]:
    """One request on a fresh connection: (seconds, served from cache)."""
    req = CompileRequest(
        script_text=script,
        script_name="bench.stp",
        release=os.uname().release,
        arch=platform.machine(),
        runtime="bpf",
    )
    body = encode_compile_request(req)
    began = time.perf_counter()
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=300)
    try:
        conn.request("POST", "/compile", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    elapsed = time.perf_counter() - began
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
    result = decode_compile_response(data)
    if result.status != 0:
        raise RuntimeError(f"stap failed: {result.stderr[:200]}")
    return elapsed, result.cached


def run_level(
    port: int, ctx: ssl.SSLContext, clients: int, scripts: list[str]
) -> tuple[float, list[float], int]:
    """Send ``scripts`` from ``clients`` threads: (wall seconds, latencies, cache hits)."""
    todo = iter(scripts)
    lock = threading.Lock()
    latencies: list[float] = []
    hits = 0
    errors: list[Exception] = []

    def client() -> None:
        nonlocal hits
        while True:
            with lock:
                script = next(todo, None)
            if script is None:
                return
            try:
                seconds, cached = compile_once(port, ctx, script)
            except Exception as exc:
                errors.append(exc)
                return
            with lock:
                latencies.append(seconds)
                hits += cached

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        raise SystemExit(f"benchmark request failed: {errors[0]}")
    return wall, latencies, hits


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--uncached", type=int, default=48, help="requests per level")
    parser.add_argument("--cached", type=int, default=400, help="requests per level")
    parser.add_argument("--workers", type=int, default=0, help="MAX_COMPILES (0: CPUs)")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    root = Path(tempfile.mkdtemp(prefix="stap-server-bench-", dir="/tmp"))
    root.chmod(0o755)  # the service user must reach its state dir
    port = free_port()
    conf = root / "stap-server.conf"
    conf.write_text(
        f"PORT={port}\nSTATE_DIR={root}/state\nLOG_FILE={root}/log/server.log\n"
        f"PID_FILE={root}/run/server.pid\nMAX_COMPILES={args.workers}\n"
        "QUEUE_SIZE=1000\nQUEUE_TIMEOUT=600\nMAX_CONNECTIONS=256\n"
    )
    start = subprocess.run(
        [COMMAND, "-c", str(conf), "start"], capture_output=True, text=True, check=False
    )
    if start.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise SystemExit(start.stderr.strip())
    try:
        ctx = ssl.create_default_context(cafile=str(root / "state/.systemtap/ssl/server/stap.cert"))
        ctx.check_hostname = False
        counter = itertools.count()
        compile_once(port, ctx, SCRIPT.format(n="warm"))  # the cached script
        print(
            f"stap-server on {os.cpu_count()} CPUs, MAX_COMPILES={args.workers or 'CPUs'}; "
            "every request a new TLS connection"
        )
        print(
            f"{'kind':<9}{'clients':>8}{'requests':>9}{'req/s':>9}"
            f"{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        )
        for kind in ("uncached", "cached"):
            for clients in levels:
                if kind == "cached":
                    scripts = [SCRIPT.format(n="warm")] * args.cached
                else:
                    scripts = [SCRIPT.format(n=next(counter)) for _ in range(args.uncached)]
                wall, lat, hits = run_level(port, ctx, clients, scripts)
                expected = len(scripts) if kind == "cached" else 0
                if hits != expected:
                    raise SystemExit(f"{kind}: {hits} cache hits, expected {expected}")
                ms = [x * 1000 for x in lat]
                print(
                    f"{kind:<9}{clients:>8}{len(lat):>9}{len(lat) / wall:>9.1f}"
                    f"{statistics.median(ms):>9.1f}{percentile(ms, 90):>9.1f}"
                    f"{percentile(ms, 99):>9.1f}{max(ms):>9.1f}"
                )
    finally:
        subprocess.run([COMMAND, "-c", str(conf), "stop"], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
