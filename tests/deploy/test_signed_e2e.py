"""A production host without a compiler: caches from a trusted stap-server, signed, verified.

Real processes throughout: a real stap-server on loopback compiles with the real
stap, the host under test has no stap at all, and the BPF scripts run under the
real stapbpf (with the test-only memlock shim).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stapinit.initscript import cache, kernels
from stapinit.initscript.cache import CacheRecord, KernelIdentity
from stapinit.initscript.commands import CommandError, Initscript, Request
from stapinit.initscript.log import Log
from stapinit.initscript.settings import load_settings
from stapinit.protocol import Tapset, source_digest
from stapinit.trust.certs import generate_identity, load_certificate
from stapinit.trust.signing import sign_module
from stapinit.trust.stores import StorePaths, signer_store, system_server_store
from tests.server.helpers import Server, free_port, running_server
from tests.support.prefix import RELEASE, Prefix, process_alive, wait_for
from tests.trust.signers import make_signer

TICK = (
    "global n\n"
    'probe timer.ms(50) { n++; printf("tick %d\\n", n) }\n'
    'probe end { printf("end\\n") }\n'
)
ARCH = os.uname().machine
TICK_SOURCE = hashlib.sha256(TICK.encode()).hexdigest()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One real stap-server for the module, in a directory its user can traverse."""
    with running_server("stap-signed-test-") as started:
        yield started


@dataclass
class Production:
    """A host with no stap whose trust stores (under ``trust``) authorize the server."""

    prefix: Prefix
    trust: StorePaths
    server: Server

    def add_ticker(self, name: str, options: str = "") -> Path:
        out = self.prefix.root / f"{name}.out"
        self.prefix.add_script(name, TICK, options=f"--runtime=bpf -o {out} {options}".strip())
        return out

    def cache_file(self, name: str) -> Path:
        return self.prefix.cache_dir() / name

    def running(self) -> dict[str, str]:
        return {n: str(s["state"]) for n, s in self.prefix.status_json().items()}


@pytest.fixture
def production(tmp_path: Path, stapbpf_wrapper: Path, server: Server) -> Iterator[Production]:
    trust = StorePaths(sysconf=tmp_path / "trust" / "etc" / "systemtap", user_dir=None)
    certificate = load_certificate(server.cert_path)
    system_server_store(trust).add(certificate)
    signer_store(trust).add(certificate)
    home = tmp_path / "home"
    home.mkdir()
    prefix = Prefix(
        tmp_path / "production",
        {
            "STAPBPF": str(stapbpf_wrapper),
            "STAP": str(tmp_path / "no-compiler" / "stap"),
            "COMPILE_SERVER": f"127.0.0.1:{server.port}",
            "REQUIRE_SIGNED": "yes",
        },
        env={"STAP_TRUST_ROOT": str(tmp_path / "trust"), "HOME": str(home)},
    )
    yield Production(prefix, trust, server)
    prefix.kill_leftovers()


def test_start_compiles_through_the_server_and_runs_the_scripts(production: Production) -> None:
    prefix = production.prefix
    out = production.add_ticker("ticker")
    # -u changes the module (recorded, signed); -w only what the compile prints.
    other = production.add_ticker("other", options="-w -u")
    done = prefix.run("start")
    assert done.returncode == 0, done.stderr
    assert "Started ticker" in done.stdout and "Started other" in done.stdout
    assert production.running() == {"ticker": "running", "other": "running"}
    assert wait_for(lambda: out.exists() and len(out.read_text().splitlines()) > 3)
    assert wait_for(lambda: other.exists() and len(other.read_text().splitlines()) > 3)
    log = prefix.log()
    assert f"compiled by stap-server 127.0.0.1:{production.server.port}" in log
    # The cache is what a local compile leaves, plus the server's signature.
    names = sorted(p.name for p in prefix.cache_dir().iterdir())
    assert names == sorted(
        ["ticker.bo", "ticker.bo.sgn", "ticker.opts", "other.bo", "other.bo.sgn", "other.opts"]
    )
    record = production.cache_file("other.opts").read_text()
    assert f"release={RELEASE}\n" in record and "runtime=bpf\n" in record
    assert "options=-u\n" in record
    manifest = json.loads(production.cache_file("other.bo.sgn").read_text())["manifest"]
    assert (manifest["module_name"], manifest["release"], manifest["arch"]) == (
        "other.bo",
        RELEASE,
        ARCH,
    )
    # The signature covers what the record holds: -u, not -w.
    assert (manifest["runtime"], manifest["privilege"], manifest["options"]) == (
        "bpf",
        "stapdev",
        ["-u"],
    )
    # And the script text the server compiled: this host's own other.stp.
    assert manifest["source"] == TICK_SOURCE
    stopped = prefix.run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert out.read_text().splitlines()[-1] == "end"

    # A second start finds valid signed caches: nothing is compiled again, not
    # even where only a report option changed (other drops -w, ticker gains -v).
    mtimes = {n: production.cache_file(n).stat().st_mtime_ns for n in ("ticker.bo", "other.bo")}
    prefix.configure("ticker", f"--runtime=bpf -o {out} -v")
    prefix.configure("other", f"--runtime=bpf -o {other} -u")
    again = prefix.run("start")
    assert again.returncode == 0, again.stderr
    assert production.running() == {"ticker": "running", "other": "running"}
    assert {n: production.cache_file(n).stat().st_mtime_ns for n in mtimes} == mtimes
    assert prefix.run("stop").returncode == 0


def test_compile_command_gets_caches_from_the_server(production: Production) -> None:
    prefix = production.prefix
    production.add_ticker("tick")
    done = prefix.run("compile", "-y")
    assert (done.returncode, done.stdout) == (0, "Compiled tick\n"), done.stderr
    assert production.cache_file("tick.bo.sgn").is_file()
    status = prefix.status_json()["tick"]
    assert status["cache"] == "valid"


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_tampered_module_is_refused_or_recompiled(production: Production) -> None:
    prefix = production.prefix
    production.add_ticker("tick")
    assert prefix.run("compile", "-y").returncode == 0
    module = production.cache_file("tick.bo")
    flip_one_byte(module)

    prefix.write_config(AUTOCOMPILE="no")
    refused = prefix.run("start")
    assert refused.returncode == 1
    reason = "signature refused: module tick.bo does not match its signature"
    assert f"no valid cache for tick: {reason}" in refused.stderr
    assert reason in prefix.log()
    assert production.running() == {"tick": "stopped"}
    assert prefix.status_json()["tick"]["cache"] == f"stale: {reason}"

    prefix.write_config(AUTOCOMPILE="yes")
    recompiled = prefix.run("start")
    assert recompiled.returncode == 0, recompiled.stderr
    assert production.running() == {"tick": "running"}
    assert f"The cache of tick cannot be used: {reason}" in prefix.log()
    assert prefix.run("stop").returncode == 0


def test_a_cache_signed_by_an_untrusted_signer_is_refused(
    production: Production, tmp_path: Path
) -> None:
    prefix = production.prefix
    production.add_ticker("tick")
    assert prefix.run("compile", "-y").returncode == 0
    # Someone with their own key re-signs the module with a manifest that fits in
    # every other way.
    key, cert = generate_identity(tmp_path / "rogue.key", tmp_path / "rogue.pem", "rogue")
    module = production.cache_file("tick.bo")
    forged = sign_module(
        key,
        cert,
        module.read_bytes(),
        "tick.bo",
        RELEASE,
        ARCH,
        "stapdev",
        runtime="bpf",
        source=TICK_SOURCE,
    )
    production.cache_file("tick.bo.sgn").write_bytes(forged)
    prefix.write_config(AUTOCOMPILE="no")
    refused = prefix.run("start")
    assert refused.returncode == 1
    assert "signature refused: signer SHA256:" in refused.stderr
    assert "is not a trusted signer" in prefix.log()
    assert production.running() == {"tick": "stopped"}


def test_a_cache_without_a_signature_or_for_other_options_is_refused(
    production: Production,
) -> None:
    prefix = production.prefix
    production.add_ticker("tick")
    assert prefix.run("compile", "-y").returncode == 0
    prefix.write_config(AUTOCOMPILE="no")
    production.cache_file("tick.bo.sgn").unlink()
    unsigned = prefix.run("start")
    assert unsigned.returncode == 1
    assert "no valid cache for tick: not signed (no tick.bo.sgn)" in unsigned.stderr

    prefix.write_config(AUTOCOMPILE="yes")
    assert prefix.run("compile", "-y").returncode == 0
    # The options change, and the record is edited to claim the new ones: the
    # signature still names the old ones.
    prefix.write_config(AUTOCOMPILE="no")
    out = prefix.root / "tick.out"
    prefix.configure("tick", f"--runtime=bpf -o {out} -u")
    record = production.cache_file("tick.opts")
    record.write_text(record.read_text().replace("options=\n", "options=-u\n"))
    other_options = prefix.run("start")
    assert other_options.returncode == 1
    assert "signed for options no options, not [-u]" in other_options.stderr
    assert production.running() == {"tick": "stopped"}


def test_a_signed_cache_of_other_text_than_the_hosts_script_is_refused(
    production: Production,
) -> None:
    # The server signed tick.bo for the text it compiled; the admin's tick.stp
    # is then edited, and the record made to claim the new text: only the
    # signature can tell the module is not of this script.
    prefix = production.prefix
    production.add_ticker("tick")
    assert prefix.run("compile", "-y").returncode == 0
    prefix.write_config(AUTOCOMPILE="no")
    edited = TICK.replace("tick", "tock")
    (prefix.scripts / "tick.stp").write_text(edited)
    mine = hashlib.sha256(edited.encode()).hexdigest()
    record = production.cache_file("tick.opts")
    record.write_text(record.read_text().replace(f"source={TICK_SOURCE}\n", f"source={mine}\n"))
    refused = prefix.run("start")
    assert refused.returncode == 1
    reason = (
        f"signed for another script text or tapsets (sha256 {TICK_SOURCE[:16]}...) than "
        f"this host's tick.stp and its -I directories (sha256 {mine[:16]}...)"
    )
    assert f"no valid cache for tick: {reason}" in refused.stderr
    assert reason in prefix.log()
    assert production.running() == {"tick": "stopped"}


GREETER = 'probe timer.ms(50) { printf("greeting %d\\n", greeting()) }\n'


def test_the_admins_script_with_its_own_tapsets_verifies_until_one_is_edited(
    production: Production,
) -> None:
    # The server signs the script and the -I tapsets sent with it; start checks
    # both against this host's script and its -I directories.
    prefix = production.prefix
    library = prefix.root / "tapsets"
    library.mkdir()
    (library / "greeting.stp").write_text("function greeting:long() { return 7 }\n")
    out = prefix.root / "greet.out"
    prefix.add_script("greet", GREETER, options=f"--runtime=bpf -I {library} -o {out}")
    done = prefix.run("start")
    assert done.returncode == 0, done.stderr
    assert production.running() == {"greet": "running"}
    assert wait_for(lambda: out.exists() and "greeting 7" in out.read_text())
    assert prefix.run("stop").returncode == 0

    # The tapset is edited on the host: the cache record (the script's text
    # alone) still fits, the signature does not.
    (library / "greeting.stp").write_text("function greeting:long() { return 8 }\n")
    prefix.write_config(AUTOCOMPILE="no")
    refused = prefix.run("start")
    assert refused.returncode == 1
    signed = source_digest(
        GREETER.encode(), (Tapset("greeting.stp", "function greeting:long() { return 7 }\n"),)
    )
    mine = source_digest(
        GREETER.encode(), (Tapset("greeting.stp", "function greeting:long() { return 8 }\n"),)
    )
    reason = (
        f"signed for another script text or tapsets (sha256 {signed[:16]}...) than "
        f"this host's greet.stp and its -I directories (sha256 {mine[:16]}...)"
    )
    assert f"no valid cache for greet: {reason}" in refused.stderr
    assert production.running() == {"greet": "stopped"}

    # Allowed to compile, the host has the server compile it with the new tapset.
    prefix.write_config(AUTOCOMPILE="yes")
    out.unlink()
    recompiled = prefix.run("start")
    assert recompiled.returncode == 0, recompiled.stderr
    assert f"The cache of greet cannot be used: {reason}" in prefix.log()
    assert wait_for(lambda: out.exists() and "greeting 8" in out.read_text())
    assert prefix.run("stop").returncode == 0


def test_a_script_with_crlf_line_ends_is_signed_for_its_bytes_as_they_are(
    production: Production,
) -> None:
    # Read as text with newline translation, the request would carry other
    # bytes than the file holds, and the signed source would never match it.
    prefix = production.prefix
    out = production.add_ticker("tick")
    (prefix.scripts / "tick.stp").write_bytes(TICK.replace("\n", "\r\n").encode())
    done = prefix.run("start")
    assert done.returncode == 0, done.stderr
    assert production.running() == {"tick": "running"}
    assert wait_for(lambda: out.exists() and len(out.read_text().splitlines()) > 2)
    assert prefix.run("stop").returncode == 0


def test_a_signed_cache_only_script_is_refused(production: Production) -> None:
    # Signed by the trusted server, but with no tick.stp here nothing says it is
    # the admin's script rather than one anyone had the server compile as tick.
    prefix = production.prefix
    out = production.add_ticker("tick")
    assert prefix.run("compile", "-y").returncode == 0
    (prefix.scripts / "tick.stp").unlink()
    prefix.write_config(AUTOCOMPILE="no", ALLOW_CACHEONLY="yes")
    refused = prefix.run("start", "tick")
    assert refused.returncode == 1
    reason = "REQUIRE_SIGNED=yes: tick has no script in SCRIPT_PATH to check its signature against"
    assert reason in refused.stderr
    assert reason in prefix.log()
    assert production.running() == {"tick": "stopped"}
    assert not out.exists()


def test_server_down_at_boot_with_valid_signed_caches(production: Production) -> None:
    prefix = production.prefix
    out = production.add_ticker("tick")
    assert prefix.run("compile", "-y").returncode == 0
    # Nothing listens here: every connection would fail at once.
    prefix.write_config(COMPILE_SERVER=f"127.0.0.1:{free_port()}")
    started = prefix.run("start")
    assert started.returncode == 0, started.stderr
    assert production.running() == {"tick": "running"}
    pid = prefix.status_json()["tick"]["pid"]
    assert isinstance(pid, int) and process_alive(pid)
    assert wait_for(lambda: out.exists() and len(out.read_text().splitlines()) > 2)
    assert prefix.run("stop").returncode == 0


def test_servers_down_untrusted_or_refusing_are_one_line_each(production: Production) -> None:
    prefix = production.prefix
    production.add_ticker("tick")
    # The server refuses -B: it would hand the value to make on the server.
    production.add_ticker("bad", options="-B V=1")
    down = f"127.0.0.1:{free_port()}"
    good = f"127.0.0.1:{production.server.port}"
    prefix.write_config(COMPILE_SERVER=f"{down} {good}", PASSALL="no")
    done = prefix.run("start")
    assert done.returncode == 0, done.stderr
    assert production.running() == {"tick": "running", "bad": "stopped"}
    [line] = [line for line in done.stderr.splitlines() if "Failed to compile bad" in line]
    assert f"cannot connect to server {down}" in line
    assert f"server {good} refused the request: option -B is not accepted" in line
    assert prefix.run("stop").returncode == 0

    # The server is no longer trusted: nothing is sent to it.
    for entry in production.trust.system_servers.iterdir():
        entry.unlink()
    shutil.rmtree(prefix.cache_dir())
    prefix.write_config(COMPILE_SERVER=good, PASSALL="yes")
    untrusted = prefix.run("start", "tick")
    assert untrusted.returncode == 1
    assert f"Failed to compile tick: Server {good} is not trusted" in untrusted.stderr
    assert production.running()["tick"] == "stopped"


def test_require_signed_refuses_what_a_local_compile_made(
    tmp_path: Path, stapbpf_wrapper: Path, production: Production
) -> None:
    # A host that compiles locally makes no signature: with REQUIRE_SIGNED=yes its
    # own fresh cache is not loaded.
    local = Prefix(
        tmp_path / "local",
        {"STAPBPF": str(stapbpf_wrapper), "REQUIRE_SIGNED": "yes"},
        env=production.prefix.env,
    )
    local.add_script("tick", TICK, options="--runtime=bpf")
    done = local.run("start")
    assert done.returncode == 1
    assert "tick refused: not signed (no tick.bo.sgn)" in done.stderr
    assert local.status_json()["tick"]["state"] == "stopped"


def test_an_expired_signer_no_longer_vouches(production: Production, tmp_path: Path) -> None:
    prefix = production.prefix
    production.add_ticker("tick")
    assert prefix.run("compile", "-y").returncode == 0
    # The server's certificate is still valid; pretend the cache's signature was
    # made by one that expired (trusted, but no longer).
    now = dt.datetime.now(dt.UTC)
    key, cert = make_signer(now - dt.timedelta(days=30), now - dt.timedelta(days=1))
    signer_store(production.trust).add(cert)
    module = production.cache_file("tick.bo").read_bytes()
    old = sign_module(
        key, cert, module, "tick.bo", RELEASE, ARCH, "stapdev",
        signed_at=now - dt.timedelta(days=2), runtime="bpf", source=TICK_SOURCE,
    )  # fmt: skip
    production.cache_file("tick.bo.sgn").write_bytes(old)
    prefix.write_config(AUTOCOMPILE="no")
    refused = prefix.run("start")
    assert refused.returncode == 1
    assert "signature refused: the signer's certificate has expired" in refused.stderr


# --- kernel hooks -------------------------------------------------------------------


def service_for(prefix: Prefix, monkeypatch: pytest.MonkeyPatch) -> Initscript:
    """The service as the command builds it, in this process (to point it at a modules dir)."""
    for key, value in prefix.env.items():
        monkeypatch.setenv(key, value)
    log = Log(prefix.log_file, io.StringIO(), io.StringIO())
    log.open()
    return Initscript(load_settings(prefix.config), log, lambda _question: True)


def test_a_new_kernel_without_build_tree_gets_its_caches_from_the_server(
    production: Production, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    production.add_ticker("tick")
    modules = tmp_path / "modules"
    (modules / RELEASE / "kernel").mkdir(parents=True)  # installed: modules, no headers
    service = service_for(production.prefix, monkeypatch)
    assert kernels.compile_all_kernels(service, Request(), modules) == 0
    assert production.cache_file("tick.bo.sgn").is_file()
    assert production.prefix.status_json()["tick"]["cache"] == "valid"

    # The kernel is removed: the postrm hook's cleanup takes every cache file.
    removed = production.prefix.run("cleanup", "-r", RELEASE, "-y")
    assert removed.returncode == 0, removed.stderr
    assert list(production.prefix.cache_dir().iterdir()) == []


def test_a_kernel_nothing_can_compile_for_is_reported_loudly(
    production: Production, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    production.add_ticker("tick")
    production.prefix.write_config(COMPILE_SERVER="", REQUIRE_SIGNED="no")
    modules = tmp_path / "modules"
    (modules / "0.0.0-nobuild" / "kernel").mkdir(parents=True)
    service = service_for(production.prefix, monkeypatch)
    with pytest.raises(CommandError, match="has a build tree"):
        kernels.compile_all_kernels(service, Request(), modules)
    warning = (
        "kernel 0.0.0-nobuild has no build tree and COMPILE_SERVER is not set: the boot "
        "scripts tick will not start on 0.0.0-nobuild"
    )
    assert warning in production.prefix.log()

    # Caches brought by other means (unpack) are enough: no warning then. Their
    # record names the digest of the script compiled, as a build host writes it.
    module = tmp_path / "tick.bo"
    module.write_bytes(b"\x7fELF")
    digest = hashlib.sha256(TICK.encode()).hexdigest()
    record = CacheRecord(KernelIdentity("0.0.0-nobuild", "", ARCH), "bpf", (), digest)
    directory = production.prefix.cache_dir("0.0.0-nobuild")
    cache.install(directory, "tick", ".bo", module, record)
    production.prefix.log_file.unlink()
    service = service_for(production.prefix, monkeypatch)
    with pytest.raises(CommandError, match="has a build tree"):
        kernels.compile_all_kernels(service, Request(), modules)
    assert "will not start" not in production.prefix.log()
