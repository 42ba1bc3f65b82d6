"""Signed deployment (issue 14): pack carries signatures; unpack verifies them when asked.

The build host's caches are signed as the compile server signs them; the
target trusts signers in its own store (``STAP_TRUST_ROOT/etc/systemtap/staprun``)
and sets ``REQUIRE_SIGNED=yes``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from stapinit.trust.certs import fingerprint
from stapinit.trust.signing import SIGNATURE_SUFFIX, sign_module
from stapinit.trust.stores import signer_store_at
from tests.deploy.conftest import TICK, Hosts, listed, write_tar
from tests.support.prefix import RELEASE
from tests.trust.signers import make_signer

BO = f"cache/{RELEASE}/tick.bo"
SGN = f"{BO}.sgn"
#: What the server signs as the source of tick: the digest of its text.
TICK_SOURCE = hashlib.sha256(TICK.encode()).hexdigest()


@dataclass
class Signer:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def sign(
        self,
        module: bytes,
        name: str = "tick.bo",
        release: str = RELEASE,
        options: tuple[str, ...] = (),
        source: str = TICK_SOURCE,
    ) -> bytes:
        """A signature as stap-server makes it, for tick as configured (no compile options)."""
        machine = os.uname().machine
        return sign_module(
            self.key,
            self.cert,
            module,
            name,
            release,
            machine,
            "stapdev",
            options=options,
            source=source,
        )


def new_signer(name: str) -> Signer:
    now = dt.datetime.now(dt.UTC)
    return Signer(*make_signer(now - dt.timedelta(days=1), now + dt.timedelta(days=30), name))


@pytest.fixture
def server() -> Signer:
    """The compile server the target trusts."""
    return new_signer("server.example")


def sign_on_build_host(
    hosts: Hosts, server: Signer, options: str = "", signed: tuple[str, ...] = ()
) -> Hosts:
    """tick compiled with ``options`` and signed for ``signed`` on the build host;
    the target trusts ``server``, requires it and has the same tick.stp (its
    admin's script, placed there as the admin places it, without conf.d)."""
    hosts.build.add_script("tick", TICK, options=f"--runtime=bpf {options}".strip())
    assert hosts.build.run("compile", "-y").returncode == 0
    module = hosts.build.cache_dir() / "tick.bo"
    (hosts.build.cache_dir() / f"tick.bo{SIGNATURE_SUFFIX}").write_bytes(
        server.sign(module.read_bytes(), options=signed)
    )
    trust_root = hosts.root / "trust"
    signer_store_at(trust_root / "etc" / "systemtap" / "staprun").add(server.cert)
    hosts.target.env["STAP_TRUST_ROOT"] = str(trust_root)
    (hosts.target.scripts / "tick.stp").write_text(TICK)
    hosts.target.write_config(REQUIRE_SIGNED="yes")
    return hosts


@pytest.fixture
def signed_hosts(hosts: Hosts, server: Signer) -> Hosts:
    """tick without compile options, signed as the server signs it."""
    return sign_on_build_host(hosts, server)


def pack(hosts: Hosts) -> dict[str, bytes]:
    archive = hosts.root / "signed.tgz"
    done = hosts.build.run("pack", "-o", str(archive))
    assert done.returncode == 0, done.stderr
    with tarfile.open(archive) as members:
        files = {}
        for info in members.getmembers():
            handle = members.extractfile(info)
            assert handle is not None
            files[info.name] = handle.read()
    files.pop("MANIFEST")
    return files


def test_pack_carries_the_signature_and_unpack_installs_it_when_it_verifies(
    signed_hosts: Hosts,
) -> None:
    files = pack(signed_hosts)
    assert SGN in files
    archive = signed_hosts.root / "signed.tgz"
    done = signed_hosts.target.run("unpack", str(archive))
    assert done.returncode == 0, done.stderr
    cache = signed_hosts.target.cache_dir()
    assert sorted(p.name for p in cache.iterdir()) == ["tick.bo", "tick.bo.sgn", "tick.opts"]
    assert (cache / "tick.bo.sgn").read_bytes() == files[SGN]
    assert "Verified the signatures of 1 modules" in signed_hosts.target.log()
    started = signed_hosts.target.run("start")
    assert started.returncode == 0, started.stderr
    assert signed_hosts.target.run("stop").returncode == 0


def test_only_the_releases_installed_are_verified_and_installed(signed_hosts: Hosts) -> None:
    # A fleet archive: another release's signature is not this host's concern.
    fleet = "0.0.0-fleet"
    build = signed_hosts.build
    shutil.copytree(build.cache_dir(), build.cache_dir(fleet))
    record = build.cache_dir(fleet) / "tick.opts"
    record.write_text(record.read_text().replace(f"release={RELEASE}\n", f"release={fleet}\n"))
    (build.cache_dir(fleet) / "tick.bo.sgn").write_bytes(b"not a signature")
    archive = signed_hosts.root / "fleet.tgz"
    done = build.run("pack", "-r", RELEASE, "-r", fleet, "-o", str(archive))
    assert done.returncode == 0, done.stderr
    unpacked = signed_hosts.target.run("unpack", str(archive))
    assert unpacked.returncode == 0, unpacked.stderr
    assert f"Skipped {fleet}: not installed on this host" in unpacked.stdout
    assert (signed_hosts.target.cache_dir() / "tick.bo.sgn").exists()
    assert not signed_hosts.target.cache_dir(fleet).exists()


def refused(hosts: Hosts, files: dict[str, bytes], why: str) -> None:
    """Unpacking ``files`` (with a manifest that matches them) installs nothing, saying ``why``."""
    archive = hosts.root / "hostile.tgz"
    write_tar(archive, listed(files))
    done = hosts.target.run("unpack", "-y", str(archive))
    assert done.returncode == 1
    assert done.stderr == f"systemtap-service: {archive}: {why}; nothing installed\n"
    assert not hosts.target.cache_dir().exists()
    assert list((hosts.target.root / "conf.d").iterdir()) == []


def test_a_module_signed_by_an_untrusted_signer_installs_nothing(signed_hosts: Hosts) -> None:
    files = pack(signed_hosts)
    stranger = new_signer("stranger.example")
    refused(
        signed_hosts,
        {**files, SGN: stranger.sign(files[BO])},
        f"{BO}: signature refused: signer {fingerprint(stranger.cert)} is not a trusted signer",
    )


def test_an_unsigned_module_installs_nothing(signed_hosts: Hosts) -> None:
    files = pack(signed_hosts)
    del files[SGN]
    refused(signed_hosts, files, f"{BO} is not signed, and REQUIRE_SIGNED=yes")


def test_an_altered_module_installs_nothing(signed_hosts: Hosts) -> None:
    files = pack(signed_hosts)
    module = bytearray(files[BO])
    module[-1] ^= 1  # the manifest's checksum is made to match: only the signature can tell
    refused(
        signed_hosts,
        {**files, BO: bytes(module)},
        f"{BO}: signature refused: module tick.bo does not match its signature",
    )


def test_a_signature_for_another_module_installs_nothing(
    signed_hosts: Hosts, server: Signer
) -> None:
    files = pack(signed_hosts)
    refused(
        signed_hosts,
        {**files, SGN: server.sign(files[BO], name="other.bo")},
        f"{BO}: signed for module name 'other.bo', not 'tick.bo'",
    )


def test_a_signature_for_other_compile_options_installs_nothing(
    signed_hosts: Hosts, server: Signer
) -> None:
    # The archive's conf.d file says tick has no compile options; the server
    # signed it for -u: start would refuse it, so unpack does not install it.
    files = pack(signed_hosts)
    refused(
        signed_hosts,
        {**files, SGN: server.sign(files[BO], options=("-u",))},
        f"{BO}: signed for options [-u], not no options",
    )


def test_report_options_in_the_archive_are_not_what_the_signature_covers(
    hosts: Hosts, server: Signer
) -> None:
    # Compiled with -w -u: the server signs -u alone, the option the record holds.
    sign_on_build_host(hosts, server, options="-w -u", signed=("-u",))
    files = pack(hosts)
    assert "tick_OPT='--runtime=bpf -w -u'" in files["conf.d/tick.conf"].decode()
    archive = hosts.root / "signed.tgz"
    done = hosts.target.run("unpack", "-y", str(archive))
    assert done.returncode == 0, done.stderr
    assert "Verified the signatures of 1 modules" in hosts.target.log()
    started = hosts.target.run("start")
    assert started.returncode == 0, started.stderr
    assert hosts.target.run("stop").returncode == 0


def test_a_module_of_a_script_the_target_does_not_have_installs_nothing(
    signed_hosts: Hosts,
) -> None:
    # A signature says which server compiled it, not that it is this admin's script.
    files = pack(signed_hosts)
    script = signed_hosts.target.scripts / "tick.stp"
    script.unlink()
    refused(
        signed_hosts,
        files,
        f"{BO}: REQUIRE_SIGNED=yes: tick has no script in SCRIPT_PATH to check its "
        f"signature against ({script})",
    )


def test_a_module_compiled_from_other_text_than_the_targets_script_installs_nothing(
    signed_hosts: Hosts,
) -> None:
    files = pack(signed_hosts)
    edited = TICK.replace("tick", "tock")
    assert edited != TICK
    (signed_hosts.target.scripts / "tick.stp").write_text(edited)
    mine = hashlib.sha256(edited.encode()).hexdigest()
    refused(
        signed_hosts,
        files,
        f"{BO}: signed for another script text or tapsets (sha256 {TICK_SOURCE[:16]}...) "
        f"than this host's tick.stp and its -I directories (sha256 {mine[:16]}...)",
    )


def test_a_signature_for_another_release_installs_nothing(
    signed_hosts: Hosts, server: Signer
) -> None:
    files = pack(signed_hosts)
    refused(
        signed_hosts,
        {**files, SGN: server.sign(files[BO], release="0.0.0-other")},
        f"{BO}: signed for release '0.0.0-other', not '{RELEASE}'",
    )


def test_an_empty_signer_store_installs_nothing(signed_hosts: Hosts) -> None:
    files = pack(signed_hosts)
    signers = signed_hosts.root / "trust" / "etc" / "systemtap" / "staprun"
    for cert in signers.iterdir():
        cert.unlink()
    refused(signed_hosts, files, f"{BO}: no trusted signer in {signers} (REQUIRE_SIGNED=yes)")


def test_without_require_signed_the_signature_is_carried_unchecked(
    signed_hosts: Hosts,
) -> None:
    files = pack(signed_hosts)
    signed_hosts.target.write_config(REQUIRE_SIGNED="no")
    archive = signed_hosts.root / "stranger.tgz"
    write_tar(archive, listed({**files, SGN: new_signer("stranger").sign(files[BO])}))
    done = signed_hosts.target.run("unpack", "-y", str(archive))
    assert done.returncode == 0, done.stderr
    assert (signed_hosts.target.cache_dir() / "tick.bo.sgn").exists()


def test_the_crypto_library_is_loaded_only_for_require_signed() -> None:
    probe = (
        "import sys\n"
        "from stapinit.initscript import cli, packing\n"
        "assert not [m for m in sys.modules if m.startswith(('cryptography', 'stapinit.trust'))]\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
