"""Spec §6 end to end: real server, real loader, real stapbpf, real users."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from stapinit import loader_wire as wire
from stapinit.trust.certs import fingerprint, load_certificate
from tests.client.conftest import HELLO, Site
from tests.loader.conftest import encode_load_request, popen_as
from tests.support import shared_install
from tests.trust.bpfmodules import process_probe_script
from tests.trust.people import VENV_BIN


def untrusted_line(site: Site) -> str:
    fp = fingerprint(load_certificate(site.server.cert_path))
    return (
        f"stap-client: Server 127.0.0.1:{site.server.port} is not trusted (certificate {fp}). "
        "Authorize it with: stap-authorize-server-cert <certfile>\n"
    )


def test_6_2_1_hello_for_root_and_stapdev_once_authorized(site: Site) -> None:
    for who in ("root", "sttest_dev"):
        before = site.client(who, "-e", HELLO)
        assert before.returncode == 1
        assert before.stdout == ""
        assert before.stderr == untrusted_line(site)

    site.authorize_server()
    for who in ("root", "sttest_dev"):
        after = site.client(who, "-e", HELLO)
        assert (after.returncode, after.stdout) == (0, "Hello\n"), after.stderr
    assert "sttest_dev (uid" in site.loader.log.read_text()  # the stapdev user went through it


def test_6_1_2_stapusr_needs_a_trusted_signer(site: Site) -> None:
    site.authorize_server()
    # The server signs every module; one compiled for stapdev is signed for stapdev.
    for_stapdev = site.client("sttest_usr", "-e", HELLO)
    assert for_stapdev.returncode == 1 and for_stapdev.stdout == ""
    assert "the server is not a trusted signer" in for_stapdev.stderr

    signed = site.client("sttest_usr", "-e", HELLO, "--unprivileged")
    assert signed.returncode == 1 and signed.stdout == ""
    assert "the server is not a trusted signer" in signed.stderr

    site.authorize_signer()
    beyond = site.client("sttest_usr", "-e", HELLO)
    assert beyond.returncode == 1 and beyond.stdout == ""
    assert (
        "was signed for privilege 'stapdev', beyond user 'sttest_usr''s stapusr; "
        "compile it with --unprivileged"
    ) in beyond.stderr
    works = site.client("sttest_usr", "-e", HELLO, "--unprivileged")
    assert (works.returncode, works.stdout) == (0, "Hello\n"), works.stderr
    same = site.client("sttest_usr", "-e", HELLO, "--privilege=stapusr")
    assert (same.returncode, same.stdout) == (0, "Hello\n"), same.stderr


def load_as(site: Site, who: str, name: str, module: bytes, sgn: bytes) -> list[wire.Frame]:
    """Hand a module straight to stap-loader, as ``who``, without stap-client."""
    request = site.homes[who] / "request"
    request.write_bytes(encode_load_request(wire.LoadRequest(name, module, sgn)))
    request.chmod(0o644)
    probe = shared_install.helper("probe_client.py")
    result = site.run(
        who, [str(VENV_BIN / "python"), str(probe), str(site.loader.socket), str(request), "all"]
    )
    assert result.returncode == 0, result.stderr
    return [
        wire.Frame(f["header"], f["payload"].encode("latin-1")) for f in json.loads(result.stdout)
    ]


def test_altered_signed_modules_are_refused(site: Site) -> None:
    site.authorize_server()
    site.authorize_signer()
    home = site.homes["sttest_usr"]
    compiled = site.client("sttest_usr", "-e", HELLO, "--unprivileged", "-p4")
    assert compiled.returncode == 0, compiled.stderr
    name = compiled.stdout.strip()
    module = (home / name).read_bytes()
    sgn = (home / f"{name}.sgn").read_bytes()

    intact = load_as(site, "sttest_usr", name, module, sgn)
    assert [f.payload for f in intact if f.type == "output"] == [b"Hello\n"]

    flipped = bytearray(module)
    flipped[len(flipped) // 2] ^= 0x01
    frames = load_as(site, "sttest_usr", name, bytes(flipped), sgn)
    assert [f.type for f in frames] == ["refused"]
    assert "has been altered since it was signed" in frames[0].header["reason"]

    doc = json.loads(sgn)
    doc["manifest"]["privilege"] = "stapdev"
    frames = load_as(site, "sttest_usr", name, module, json.dumps(doc).encode())
    assert [f.type for f in frames] == ["refused"]
    assert "has been altered since it was signed" in frames[0].header["reason"]


def test_6_1_3_ordinary_user_compiles_but_cannot_load(site: Site) -> None:
    site.authorize_server()
    site.authorize_signer()
    home = site.homes["sttest_plain"]
    for extra in ([], ["--unprivileged"]):
        result = site.client("sttest_plain", "-e", HELLO, "-p4", *extra)
        assert result.returncode == 0, result.stderr
        name = result.stdout.strip()
        assert name.endswith(".bo") and "\n" not in name
        assert (home / name).stat().st_uid == site.users["sttest_plain"].uid
        assert (home / f"{name}.sgn").exists()  # every module comes signed
    for extra in ([], ["--unprivileged"]):
        refused = site.client("sttest_plain", "-e", HELLO, *extra)
        assert refused.returncode == 1 and refused.stdout == ""
        assert "is not root nor a member of stapdev, stapsys or stapusr" in refused.stderr


def test_store_writable_by_a_user_is_not_trusted_system_wide(site: Site) -> None:
    site.authorize_server()
    plain = site.users["sttest_plain"]
    os.chown(site.system_store, plain.uid, plain.gid)
    result = site.client("root", "-e", HELLO)
    assert result.returncode == 1
    assert f"is owned by uid {plain.uid}, not root" in result.stderr
    assert "ignoring the system-wide server trust store" in result.stderr
    assert untrusted_line(site) in result.stderr

    os.chown(site.system_store, 0, 0)
    site.system_store.chmod(0o777)
    result = site.client("sttest_dev", "-e", HELLO)
    assert result.returncode == 1
    assert "is writable by group or others (mode 0777)" in result.stderr
    assert untrusted_line(site) in result.stderr


def test_a_user_may_trust_a_server_for_themselves(site: Site) -> None:
    cert = site.base / "server.cert"
    cert.write_bytes(site.server.cert_path.read_bytes())
    cert.chmod(0o644)
    added = site.run("sttest_dev", ["stap-authorize-server-cert", str(cert)])
    assert added.returncode == 0, added.stderr
    assert (site.client("sttest_dev", "-e", HELLO).stdout) == "Hello\n"
    assert site.client("sttest_usr", "-e", HELLO).stderr == untrusted_line(site)


def test_stap_messages_and_status_come_through(site: Site) -> None:
    site.authorize_server()
    result = site.client("sttest_dev", "-e", "probe begin { no_such_function() }")
    assert result.returncode != 0
    assert "semantic error" in result.stderr
    script = site.homes["sttest_dev"] / "count.stp"
    script.write_text('probe begin { printf("%s-%d\\n", @1, $2); exit() }\n')
    ran = site.client("sttest_dev", str(script), "word", "42", "-o", "out.txt")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == ""
    assert (site.homes["sttest_dev"] / "out.txt").read_text() == "word-42\n"


TICKING = 'probe timer.ms(50) { printf("tick\\n") } probe end { printf("bye\\n") }'


@pytest.mark.parametrize(
    ("who", "signum"),
    [
        ("sttest_dev", signal.SIGINT),  # through stap-loader
        ("root", signal.SIGINT),  # root runs it itself, in its own session
        ("root", signal.SIGTERM),
        ("root", signal.SIGHUP),
    ],
)
def test_a_signal_stops_the_module_cleanly(site: Site, who: str, signum: int) -> None:
    site.authorize_server()
    user = None if who == "root" else site.users[who]
    env = {"STAP_TRUST_ROOT": str(site.trust_root), "HOME": str(site.homes[who])}
    proc = popen_as(user, ["stap-client", "-e", TICKING], env, site.homes[who])
    assert proc.stdout is not None
    assert proc.stdout.readline() == "tick\n"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out.rstrip().endswith("bye")
    if user is not None:
        deadline = time.monotonic() + 5
        while "exited with status" not in site.loader.log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_root_output_file_and_tapsets(site: Site) -> None:
    site.authorize_server()
    tapsets = site.homes["sttest_dev"] / "tapsets"
    tapsets.mkdir()
    (tapsets / "greet.stp").write_text('function greeting() { return "from a tapset" }\n')
    for who in ("sttest_dev", "root"):
        result = site.client(
            who, "-I", str(tapsets), "-o", "out.txt", "-e",
            'probe begin { printf("%s\\n", greeting()); exit() }',
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert (site.homes[who] / "out.txt").read_text() == "from a tapset\n"


def test_another_kernel_release_is_only_compiled(site: Site) -> None:
    others = [
        p.parents[1].name
        for p in Path("/lib/modules").glob("*/build/.config")
        if p.parents[1].name != os.uname().release
    ]
    if not others:
        pytest.skip("only the running kernel has a build tree here")
    site.authorize_server()
    result = site.client("sttest_plain", "-r", others[0], "-e", HELLO)
    assert result.returncode == 0, result.stderr
    assert f"kernel release {others[0]} is not this host's: compiling only (-p4)" in result.stderr
    name = result.stdout.strip()
    assert (site.homes["sttest_plain"] / name).is_file()
    assert "sttest_plain" not in site.loader.log.read_text()


def test_without_a_loader_the_user_is_told_so(site: Site) -> None:
    site.authorize_server()
    own = site.homes["sttest_dev"] / ".systemtap"
    own.mkdir()
    (own / "client.conf").write_text(f"[client]\nloader_socket = {site.base / 'none.sock'}\n")
    result = site.client("sttest_dev", "-e", HELLO)
    assert result.returncode == 1
    assert result.stderr.endswith(
        f"stap-client: cannot reach stap-loader at {site.base / 'none.sock'}: "
        "No such file or directory; non-root users load modules through the stap-loader service\n"
    )


def test_a_refused_compile_prints_nothing_on_stdout(site: Site, victim: Path) -> None:
    # Issue 13: the server refuses to sign a BPF module that probes user space
    # for stapusr; stap had printed the module's name, and nothing was produced.
    site.authorize_server()
    script = process_probe_script(victim)
    for extra in (["-p4"], []):
        result = site.client("sttest_usr", "--unprivileged", *extra, "-e", script)
        assert result.returncode == 1
        assert result.stdout == "", result.stdout
        assert "user-space probes" in result.stderr
        assert not list(site.homes["sttest_usr"].glob("*.bo"))
