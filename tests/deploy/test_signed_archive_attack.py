"""A trusted server's signature does not make any script it compiled run as root.

The red-team attack (redteam/test_signed_archive_any_script.py): an anonymous
network client has the real stap-server compile and sign its own script, under
a module name of its choosing, for stapdev; it packs the result with the
project's own ``pack``; root on a host that trusts that server as a signer
(``REQUIRE_SIGNED=yes``, ``AUTOCOMPILE=no``, ``ALLOW_CACHEONLY=yes``) runs
``unpack`` and ``start``. The signature binds the script text and the ``-I``
tapsets compiled with it (manifest ``source``), and such a host loads a module
only for a script of its own whose text, and the tapsets of whose ``-I``
directories, are those: the attack installs nothing and runs nothing, while the
admin's own script, compiled by the same server, is installed and runs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stapinit.initscript import cache
from stapinit.initscript.cache import CacheRecord, KernelIdentity
from stapinit.protocol import Tapset, decode_compile_response, source_digest
from stapinit.trust.certs import load_certificate
from stapinit.trust.stores import signer_store_at
from tests.server.helpers import Server, bpf_request, running_server
from tests.support.prefix import RELEASE, Prefix, wait_for

EVIL = 'probe timer.ms(100) { printf("ATTACKER CODE RUNNING AS uid %d\\n", uid()) }\n'
TICK = 'probe timer.ms(50) { printf("admin tick\\n") }\n'


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """The real stap-server the target trusts as a signer."""
    with running_server("stap-attack-test-") as started:
        yield started


@dataclass
class Hosts:
    root: Path
    stapbpf: Path
    server: Server

    def pack_from_server(self, name: str, text: str, tapsets: tuple[Tapset, ...] = ()) -> Path:
        """What anyone who can reach the server can make: ``text`` compiled with
        ``tapsets`` and signed as module ``name``, packed with the project's own ``pack``."""
        request = bpf_request(text, script_name=f"{name}.stp", module_name=name, tapsets=tapsets)
        reply = self.server.compile(request)
        assert reply.status == 200, reply.body
        answer = decode_compile_response(reply.body)
        assert answer.module is not None and answer.signature is not None
        packer = Prefix(
            self.root / f"packer-{name}",
            {"STAPBPF": str(self.stapbpf), "ALLOW_CACHEONLY": "yes"},
        )
        built = self.root / f"{name}.bo"
        built.write_bytes(answer.module.data)
        uname = os.uname()
        kernel = KernelIdentity(RELEASE, uname.version, uname.machine)
        # The record a build host's compile writes: the text's digest, as the manifest's.
        record = CacheRecord(kernel, "bpf", (), hashlib.sha256(text.encode()).hexdigest())
        cache.install(packer.cache_dir(), name, ".bo", built, record, answer.signature)
        (packer.root / "conf.d" / f"{name}.conf").write_text(f'{name}_OPT="--runtime=bpf"\n')
        archive = self.root / f"{name}.tgz"
        packed = packer.run("pack", "-o", str(archive))
        assert packed.returncode == 0, packed.stderr
        return archive

    def target(self) -> Prefix:
        """Root's production host: no compiler, trusts the server, requires signatures."""
        trust_root = self.root / "trust"
        signer_store_at(trust_root / "etc" / "systemtap" / "staprun").add(
            load_certificate(self.server.cert_path)
        )
        return Prefix(
            self.root / "target",
            {
                "STAPBPF": str(self.stapbpf),
                "STAP": str(self.root / "no-compiler" / "stap"),
                "AUTOCOMPILE": "no",
                "ALLOW_CACHEONLY": "yes",
                "REQUIRE_SIGNED": "yes",
            },
            env={"STAP_TRUST_ROOT": str(trust_root)},
        )


@pytest.fixture
def hosts(tmp_path: Path, stapbpf_wrapper: Path, server: Server) -> Iterator[Hosts]:
    made = Hosts(tmp_path, stapbpf_wrapper, server)
    yield made
    Prefix(tmp_path / "target", {}).kill_leftovers()


def assert_nothing_installed(target: Prefix) -> None:
    assert not target.cache_dir().exists()
    assert list((target.root / "conf.d").iterdir()) == []


def test_an_attackers_signed_module_installs_nothing_and_runs_nothing(hosts: Hosts) -> None:
    archive = hosts.pack_from_server("evil", EVIL)
    target = hosts.target()
    unpacked = target.run("unpack", "-y", str(archive))
    assert unpacked.returncode == 1
    why = (
        f"cache/{RELEASE}/evil.bo: REQUIRE_SIGNED=yes: evil has no script in SCRIPT_PATH "
        f"to check its signature against ({target.scripts / 'evil.stp'})"
    )
    assert unpacked.stderr == f"systemtap-service: {archive}: {why}; nothing installed\n"
    assert_nothing_installed(target)
    started = target.run("start")
    assert started.returncode == 0, started.stderr  # nothing to start
    assert target.status_json() == {}
    assert "ATTACKER CODE" not in target.log()


def test_an_attackers_module_named_after_the_admins_script_installs_nothing(
    hosts: Hosts,
) -> None:
    archive = hosts.pack_from_server("tick", EVIL)
    target = hosts.target()
    (target.scripts / "tick.stp").write_text(TICK)
    unpacked = target.run("unpack", "-y", str(archive))
    assert unpacked.returncode == 1
    evil, mine = (hashlib.sha256(t.encode()).hexdigest()[:16] for t in (EVIL, TICK))
    why = (
        f"cache/{RELEASE}/tick.bo: signed for another script text or tapsets "
        f"(sha256 {evil}...) than this host's tick.stp and its -I directories "
        f"(sha256 {mine}...)"
    )
    assert unpacked.stderr == f"systemtap-service: {archive}: {why}; nothing installed\n"
    assert_nothing_installed(target)


# The host's own harmless script, and a tapset of the attacker's: it provides
# pid(), which the script calls, and, riding along, a probe of their own
# (recheck/test_signed_tapset_injection.py).
AUDIT = 'probe timer.ms(100) { printf("audit pid %d\\n", pid()) }\n'
EVIL_TAPSET = Tapset(
    "evil.stp",
    "function pid:long() { return 4242 }\n"
    'probe begin { printf("ATTACKER TAPSET CODE RUNNING\\n") }\n',
)


def test_the_admins_script_text_with_an_attackers_tapset_installs_nothing(
    hosts: Hosts,
) -> None:
    archive = hosts.pack_from_server("audit", AUDIT, (EVIL_TAPSET,))
    target = hosts.target()
    target.add_script("audit", AUDIT, options="--runtime=bpf")
    unpacked = target.run("unpack", "-y", str(archive))
    assert unpacked.returncode == 1
    signed = source_digest(AUDIT.encode(), (EVIL_TAPSET,))[:16]
    mine = hashlib.sha256(AUDIT.encode()).hexdigest()[:16]
    why = (
        f"cache/{RELEASE}/audit.bo: signed for another script text or tapsets "
        f"(sha256 {signed}...) than this host's audit.stp and its -I directories "
        f"(sha256 {mine}...)"
    )
    assert unpacked.stderr == f"systemtap-service: {archive}: {why}; nothing installed\n"
    assert not target.cache_dir().exists()
    assert target.run("start").returncode == 1  # the script has no cache, and no compiler
    assert target.status_json()["audit"]["state"] == "stopped"

    # Put in the cache past unpack: start refuses it too.
    target.write_config(REQUIRE_SIGNED="no")
    assert target.run("unpack", "-y", str(archive)).returncode == 0
    target.write_config(REQUIRE_SIGNED="yes")
    try:
        started = target.run("start", "audit")
        assert started.returncode == 1
        assert f"no valid cache for audit: {why.partition(': ')[2]}" in started.stderr
        assert target.status_json()["audit"]["state"] == "stopped"
    finally:
        target.run("stop")
    assert "ATTACKER TAPSET CODE" not in target.log()


def test_the_attackers_module_put_in_the_cache_does_not_start(hosts: Hosts) -> None:
    # Past unpack (copied by hand, or by an older version): start refuses it too.
    archive = hosts.pack_from_server("evil", EVIL)
    target = hosts.target()
    target.write_config(REQUIRE_SIGNED="no")
    assert target.run("unpack", "-y", str(archive)).returncode == 0
    target.write_config(REQUIRE_SIGNED="yes")
    started = target.run("start", "evil")
    assert started.returncode == 1
    reason = "REQUIRE_SIGNED=yes: evil has no script in SCRIPT_PATH to check its signature against"
    assert reason in started.stderr
    assert reason in target.log()
    assert target.status_json()["evil"]["state"] == "stopped"
    assert "ATTACKER CODE" not in target.log()


def test_the_admins_own_script_compiled_by_the_server_installs_and_runs(hosts: Hosts) -> None:
    archive = hosts.pack_from_server("tick", TICK)
    target = hosts.target()
    (target.scripts / "tick.stp").write_text(TICK)
    unpacked = target.run("unpack", "-y", str(archive))
    assert unpacked.returncode == 0, unpacked.stderr
    assert "Verified the signatures of 1 modules" in target.log()
    try:
        started = target.run("start")
        assert started.returncode == 0, started.stderr
        assert target.status_json()["tick"]["state"] == "running"
        assert wait_for(lambda: "admin tick" in target.log())
    finally:
        assert target.run("stop").returncode == 0
