"""What REQUIRE_SIGNED=yes costs ``start``: 20 scripts with valid signed caches.

Each script's cache is a module of ``--module-kb`` random bytes with its
``.opts`` record and a ``.sgn`` signed by a key that the trust store under
``$STAP_TRUST_ROOT`` authorizes. ``staprun`` is a plain-sh stand-in, so the
difference between the two figures is the verification: importing the crypto
library, reading the signer store, hashing every module and checking every
signature. Both wall time and CPU time (user + system, of the command and
the stand-ins it runs) are shown: on a busy machine the CPU time is the
steadier figure. Run as root (trust stores must belong to root). Usage:

    .venv/bin/python bench/verify_signed.py [--count 20] [--module-kb 256] [--repeat 7]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from layout import lay_out, stand_ins

from stapinit.trust.certs import generate_identity
from stapinit.trust.signing import sign_module
from stapinit.trust.stores import StorePaths, signer_store

COMMAND = str(Path(sys.executable).parent / "systemtap-service")
SCRIPT = b"probe begin {}\n"
SOURCE = hashlib.sha256(SCRIPT).hexdigest()  # what the server signs as the script's text


def make_host(root: Path, count: int, module_kb: int) -> Path:
    """Scripts, signed caches and a trust store under ``root``; returns the config file."""
    (root / "trust").mkdir(parents=True)
    config = lay_out(root, **stand_ins(root))
    for i in range(count):
        (root / "script.d" / f"s{i}.stp").write_bytes(SCRIPT)
    run(config, root, "compile", "-y")  # the .opts records, as a compile makes them
    key, cert = generate_identity(root / "signer.key", root / "signer.pem", "bench-signer")
    signer_store(StorePaths(root / "trust" / "etc" / "systemtap", None)).add(cert)
    uname = os.uname()
    cache = root / "cache" / uname.release
    for i in range(count):
        module = os.urandom(module_kb * 1024)
        (cache / f"s{i}.ko").write_bytes(module)
        sgn = sign_module(
            key, cert, module, f"s{i}.ko", uname.release, uname.machine, "stapdev", source=SOURCE
        )
        (cache / f"s{i}.ko.sgn").write_bytes(sgn)
    return config


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(config: Path, root: Path, *args: str, require_signed: bool = False) -> tuple[float, float]:
    """Wall and CPU seconds one command takes; exits when it fails."""
    env = {
        "MODULES": str(root / "modules"),
        "PATH": "/usr/bin:/bin",
        "STAP_TRUST_ROOT": str(root / "trust"),
    }
    if require_signed:
        # A later conf.d file overrides the global one (spec §4.1).
        (root / "conf.d" / "signed.conf").write_text("REQUIRE_SIGNED=yes\n")
    else:
        (root / "conf.d" / "signed.conf").unlink(missing_ok=True)
    cpu = _children_cpu()
    began = time.perf_counter()
    done = subprocess.run(
        [COMMAND, *args, "-c", str(config)], capture_output=True, text=True, env=env
    )
    elapsed = time.perf_counter() - began
    if done.returncode != 0 or (args[0] == "start" and "Started" not in done.stdout):
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed, _children_cpu() - cpu


def import_cost(repeat: int) -> tuple[float, float]:
    """Median wall and CPU seconds that importing the crypto library adds to an interpreter.

    The part of the added cost that lies outside this project: what verifying
    anything with ``cryptography`` costs before the first byte is read.
    """
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    code = {
        False: "pass",
        True: "import cryptography.x509, cryptography.hazmat.primitives.asymmetric.ec",
    }
    for _ in range(repeat):
        for crypto in (False, True):
            used = _children_cpu()
            began = time.perf_counter()
            subprocess.run([sys.executable, "-c", code[crypto]], check=True)
            wall[crypto].append(time.perf_counter() - began)
            cpu[crypto].append(_children_cpu() - used)
    return (
        statistics.median(wall[True]) - statistics.median(wall[False]),
        statistics.median(cpu[True]) - statistics.median(cpu[False]),
    )


BREAKDOWN = """
import sys, time
from pathlib import Path
import stapinit.initscript.cli
from stapinit.initscript.cache import running_kernel
from stapinit.initscript.scripts import cache_dir, find_scripts
from stapinit.initscript.settings import load_settings
began = time.process_time()
from stapinit.initscript import verify
imported = time.process_time()
settings = load_settings(Path(sys.argv[1]))
kernel = running_kernel()
scripts = find_scripts(settings, kernel.release, print).values()
directory = cache_dir(settings, kernel.release)
checking = time.process_time()
problems = [verify.signature_problem(s, kernel, directory, print) for s in scripts]
done = time.process_time()
assert problems == [None] * len(problems), problems
print(imported - began, done - checking)
"""


def breakdown(config: Path, root: Path, repeat: int) -> tuple[float, float]:
    """Median CPU seconds, in one process, of importing verify.py and of checking every cache."""
    env = {"PATH": "/usr/bin:/bin", "STAP_TRUST_ROOT": str(root / "trust")}
    imports, checks = [], []
    for _ in range(repeat):
        done = subprocess.run(
            [sys.executable, "-c", BREAKDOWN, str(config)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        first, second = done.stdout.split()
        imports.append(float(first))
        checks.append(float(second))
    return statistics.median(imports), statistics.median(checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--module-kb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: a trust store counts only when root owns it")
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = make_host(root, args.count, args.module_kb)
        for _ in range(args.repeat):
            for signed in (False, True):  # interleaved: drift hits both alike
                elapsed, used = run(config, root, "start", require_signed=signed)
                wall[signed].append(elapsed)
                cpu[signed].append(used)
                run(config, root, "stop")
        imported, checked = breakdown(config, root, args.repeat)
    print(
        f"start of {args.count} scripts with valid caches ({args.module_kb} KB modules), "
        f"median of {args.repeat}, in ms:"
    )
    print(f"  {'':20} {'wall':>8} {'cpu':>8}")
    for signed in (False, True):
        figures = [statistics.median(wall[signed]), statistics.median(cpu[signed])]
        label = f"REQUIRE_SIGNED={'yes' if signed else 'no'}:"
        print(f"  {label:20} " + " ".join(f"{f * 1000:8.1f}" for f in figures))
    added = [statistics.median(d[True]) - statistics.median(d[False]) for d in (wall, cpu)]
    print(f"  {'added:':20} " + " ".join(f"{f * 1000:+8.1f}" for f in added))
    floor = import_cost(args.repeat)
    print(f"  {'of which importing':20} " + " ".join(f"{f * 1000:+8.1f}" for f in floor))
    print("  cryptography.x509 and .ec alone")
    print(f"in one process (cpu): importing verify.py {imported * 1000:.1f} ms, checking")
    print(f"the {args.count} caches (signer store, read, hash, verify) {checked * 1000:.1f} ms")


if __name__ == "__main__":
    main()
