"""End to end: the real ``stap-server`` command on loopback, compiling with the real stap."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import select
import shutil
import socket
import ssl
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from stapinit.protocol import (
    CompileRequest,
    CompileResponse,
    Tapset,
    decode_compile_response,
    decode_error,
    decode_server_info,
)
from stapinit.trust.certs import (
    fingerprint,
    generate_identity,
    load_certificate,
    not_valid_after,
    not_valid_before,
)
from stapinit.trust.signing import SignatureError, verify_module
from tests.server.conftest import ServerFactory
from tests.server.helpers import (
    ARCH,
    HOST,
    RELEASE,
    Reply,
    Server,
    bpf_request,
    ensure_service_user,
    stap_wrapper,
)


def _unique(tag: str) -> str:
    """A small BPF script no other test sends, so it is not already cached."""
    return f'# {tag} {time.time_ns()}\nprobe begin {{ println("{tag}"); exit() }}\n'


def _compiled(server: Server, **changes: Any) -> CompileResponse:
    return _compile(server, bpf_request(**changes))


def _compile(server: Server, req: CompileRequest) -> CompileResponse:
    reply = server.compile(req)
    assert reply.status == 200, reply.body
    return decode_compile_response(reply.body)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


# --- identity and TLS ------------------------------------------------------------------


def test_info_over_tls_names_the_exported_certificate(shared_server: Server) -> None:
    cert = load_certificate(shared_server.cert_path)
    info = decode_server_info(shared_server.get("/").body)
    assert info.server == "stap-server"
    assert info.fingerprint == fingerprint(cert)
    assert RELEASE in info.releases
    assert info.arch == ARCH
    # The version of the stap installed here, as "stap -V" names it: "(version 5.1/0.192, ...".
    own = subprocess.run(["stap", "-V"], capture_output=True, text=True, check=True)
    assert f"(version {info.stap_version}," in own.stderr + own.stdout

    # Full verification, host name included, against the exported certificate.
    ctx = ssl.create_default_context(cafile=str(shared_server.cert_path))
    with (
        socket.create_connection((HOST, shared_server.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        assert "SHA256:" + hashlib.sha256(der).hexdigest() == info.fingerprint


def _owner_mode(path: Path) -> tuple[int, int]:
    info = path.lstat()
    return info.st_uid, stat.S_IMODE(info.st_mode)


def test_identity_belongs_to_root_and_the_server_to_the_service_user(
    shared_server: Server,
) -> None:
    user = ensure_service_user()
    # The key is root's alone; the certificate is for everyone to read.
    assert _owner_mode(shared_server.key_path) == (0, 0o600)
    assert _owner_mode(shared_server.cert_path) == (0, 0o644)
    state = shared_server.state_dir
    for directory in (
        state,
        state / ".systemtap",
        state / ".systemtap/ssl",
        state / ".systemtap/ssl/server",
    ):
        assert _owner_mode(directory) == (0, 0o755), directory
    # What the server writes as the service user.
    assert _owner_mode(state / "cache") == (user.pw_uid, 0o700)
    assert _owner_mode(state / "tmp") == (user.pw_uid, 0o711)
    # Started by root, the server runs as the service user, and cannot open its key.
    pid = shared_server.pid()
    assert _uid_of(pid) == user.pw_uid
    probe = subprocess.run(
        ["cat", str(shared_server.key_path)],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode != 0
    assert "Permission denied" in probe.stderr
    # Having changed its uid, it is not dumpable: a compile running as the same
    # user cannot ptrace it or read its memory (where the key now is).
    assert Path(f"/proc/{pid}/mem").stat().st_uid == 0


def test_guru_compile_cannot_include_the_key(shared_server: Server) -> None:
    """A stapdev -g compile makes gcc #include the key: gcc must not be able to open it."""
    key = shared_server.key_path
    script = f'# {time.time_ns()}\n%{{\n#include "{key}"\n%}}\nprobe begin {{ exit() }}\n'
    req = bpf_request(script_text=script, runtime="kmod", options=("-g",))
    reply = shared_server.compile(req, timeout=240)
    assert reply.status == 200, reply.body
    resp = decode_compile_response(reply.body)
    assert resp.status != 0
    assert resp.module is None
    output = resp.stdout + resp.stderr
    body_lines = [line for line in key.read_text().splitlines() if not line.startswith("-----")]
    assert body_lines
    for line in body_lines:
        assert line not in output
    # The sandbox does not show the state directory at all.
    assert f"{key}: No such file or directory" in resp.stderr


def test_plain_http_client_is_refused(shared_server: Server) -> None:
    conn = http.client.HTTPConnection(HOST, shared_server.port, timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 400
    assert "HTTPS" in decode_error(body)
    assert b"fingerprint" not in body


# --- compiling ---------------------------------------------------------------------------


def test_bpf_module_is_byte_identical_to_local_stap(shared_server: Server, tmp_path: Path) -> None:
    script = _unique("identical")
    resp = _compiled(shared_server, script_text=script, module_name="hello")
    assert resp.status == 0, resp.stderr
    assert resp.module is not None
    assert resp.module.name == "hello.bo"
    # Every module is signed, for the privilege, options and runtime it was compiled for.
    assert resp.signature is not None
    manifest = verify_module(
        resp.signature, resp.module.data, [load_certificate(shared_server.cert_path)]
    )
    assert (manifest.privilege, manifest.runtime, manifest.options) == ("stapdev", "bpf", ())
    # And the text compiled: what a host reading hello.stp computes as its digest.
    (tmp_path / "hello.stp").write_text(script)
    assert manifest.source == hashlib.sha256((tmp_path / "hello.stp").read_bytes()).hexdigest()

    subprocess.run(
        ["stap", "--runtime=bpf", "-p4", "-m", "hello", "hello.stp"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert resp.module.data == (tmp_path / "hello.bo").read_bytes()


def test_eval_script_compiles_and_stap_names_the_module(shared_server: Server) -> None:
    resp = _compiled(shared_server, script_text=_unique("eval"), script_name=None, eval=True)
    assert resp.status == 0, resp.stderr
    assert resp.module is not None
    assert resp.module.name.startswith("stap_")
    assert resp.module.name.endswith(".bo")
    assert resp.module.name in resp.stdout


def test_eval_script_reads_as_stap_input(shared_server: Server) -> None:
    # -e text reaches stap on standard input, which stap reports as <input>, like -e.
    resp = _compiled(
        shared_server, script_text='probe begin { println(1 + "a") }\n', script_name=None, eval=True
    )
    assert resp.status != 0
    assert "<input>:1:" in resp.stderr
    assert "eval.stp" not in resp.stderr


def test_stap_errors_come_back_with_temp_paths_masked(shared_server: Server) -> None:
    resp = _compiled(
        shared_server,
        script_text="probe begin { println(helper()); exit() }\n",
        tapsets=(Tapset("helper.stp", 'function helper() { return 1 + "a" }\n'),),
    )
    assert resp.status != 0
    assert resp.module is None
    assert "type mismatch" in resp.stderr
    assert "<tmpdir>/tapsets/helper.stp" in resp.stderr
    assert str(shared_server.state_dir) not in resp.stderr + resp.stdout


def test_unprivileged_compile_is_signed_and_tampering_detected(shared_server: Server) -> None:
    resp = _compiled(shared_server, script_text=_unique("signed"), privilege="stapusr")
    assert resp.status == 0, resp.stderr
    assert resp.module is not None
    assert resp.signature is not None
    cert = load_certificate(shared_server.cert_path)

    manifest = verify_module(resp.signature, resp.module.data, [cert])
    assert manifest.module_name == resp.module.name
    assert (manifest.release, manifest.arch, manifest.privilege) == (RELEASE, ARCH, "stapusr")
    assert manifest.signer_fingerprint == fingerprint(cert)
    assert manifest.module_sha256 == hashlib.sha256(resp.module.data).hexdigest()

    data = bytearray(resp.module.data)
    data[len(data) // 2] ^= 0x01
    with pytest.raises(SignatureError) as err:
        verify_module(resp.signature, bytes(data), [cert])
    assert err.value.reason == "module-altered"

    doc = json.loads(resp.signature)
    doc["manifest"]["privilege"] = "stapdev"
    with pytest.raises(SignatureError) as err:
        verify_module(json.dumps(doc).encode(), resp.module.data, [cert])
    assert err.value.reason == "bad-signature"

    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[-1] ^= 0x01
    doc["manifest"]["privilege"] = "stapusr"
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(SignatureError) as err:
        verify_module(json.dumps(doc).encode(), resp.module.data, [cert])
    assert err.value.reason == "bad-signature"


def test_unprivileged_embedded_c_is_refused_by_stap(shared_server: Server) -> None:
    script = "%{ #include <linux/kernel.h> %}\nprobe begin { exit() }\n"
    resp = _compiled(shared_server, script_text=script, privilege="stapusr")
    assert resp.status != 0
    assert "embedded code in unprivileged script; need stap -g" in resp.stderr
    assert resp.module is None
    assert resp.signature is None


@pytest.fixture(scope="module")
def victim(base_dir: Path) -> Path:
    """A small C program with debug info, readable by the service user."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    directory = base_dir / "victim"
    directory.mkdir(mode=0o755, exist_ok=True)
    source = directory / "victim.c"
    source.write_text(
        "int secret_fn(int x) { return x * 2; }\nint main(void) { return secret_fn(42) == 0; }\n"
    )
    program = directory / "victim"
    subprocess.run([gcc, "-g", "-O0", "-o", str(program), str(source)], check=True, timeout=60)
    return program


def test_unprivileged_bpf_process_probe_is_not_signed(shared_server: Server, victim: Path) -> None:
    # stapbpf cannot keep a uprobe to the loading user's own processes.
    script = f'probe process("{victim}").function("secret_fn") {{ printf("%d\\n", $x) }}\n'
    refused = _compiled(shared_server, script_text=script, privilege="stapusr")
    assert refused.status == 1
    assert (refused.module, refused.signature) == (None, None)
    assert (
        "user-space probes (process.*) are not allowed in unprivileged BPF modules: "
        "stapbpf cannot limit them to the caller's processes"
    ) in refused.stderr
    [line] = shared_server.log_lines('refused="user-space probes: uprobe/')
    assert str(victim) in line
    # Not cached: asked again, it is refused again.
    again = _compiled(shared_server, script_text=script, privilege="stapusr")
    assert (again.status, again.module, again.cached) == (1, None, False)

    # The same probe for stapdev (root-equivalent anyway) compiles, signed for stapdev
    # only; and an unprivileged module without process probes is still signed.
    for_stapdev = _compiled(shared_server, script_text=script)
    assert for_stapdev.status == 0, for_stapdev.stderr
    assert for_stapdev.module is not None and for_stapdev.signature is not None
    cert = load_certificate(shared_server.cert_path)
    assert verify_module(for_stapdev.signature, for_stapdev.module.data, [cert]).privilege == (
        "stapdev"
    )
    hello = _compiled(shared_server, script_text=_unique("still-signed"), privilege="stapusr")
    assert hello.status == 0, hello.stderr
    assert hello.module is not None and hello.signature is not None
    verify_module(hello.signature, hello.module.data, [load_certificate(shared_server.cert_path)])


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (("-g",), "-g"),
        (("-vg",), "-g"),
        (("-B", "CC=/bin/false"), "-B"),
        (("-R", "/etc"), "-R"),
        (("--tmpdir=/tmp",), "--tmpdir"),
        (("-DMAXACTION=100000",), "-D"),
        (("-m", "evil"), "-m"),
    ],
)
def test_unprivileged_forbidden_options_are_refused(
    shared_server: Server, options: tuple[str, ...], named: str
) -> None:
    reply = shared_server.compile(bpf_request(privilege="stapusr", options=options))
    assert reply.status == 400
    assert (
        decode_error(reply.body)
        == f"You can't specify {named} when --privilege=stapusr is specified."
    )


def test_unprivileged_module_name_and_tapsets_are_refused(shared_server: Server) -> None:
    named = shared_server.compile(bpf_request(privilege="stapusr", module_name="mine"))
    assert named.status == 400
    assert "-m" in decode_error(named.body)
    tapset = Tapset("t.stp", "function f() %{ /* unprivileged */ %}\n")
    with_tapset = shared_server.compile(bpf_request(privilege="stapusr", tapsets=(tapset,)))
    assert with_tapset.status == 400
    assert decode_error(with_tapset.body).startswith("You can't specify -I")


def test_server_paths_refused_even_for_stapdev(shared_server: Server) -> None:
    reply = shared_server.compile(bpf_request(options=("-R", "/etc")))
    assert reply.status == 400
    assert decode_error(reply.body) == "option -R is not accepted by this server"


def test_unsupported_release_lists_the_supported_ones(shared_server: Server) -> None:
    reply = shared_server.compile(bpf_request(release="2.6.32-nosuch"))
    assert reply.status == 400
    message = decode_error(reply.body)
    assert "2.6.32-nosuch" in message
    assert RELEASE in message


def test_identical_request_is_served_from_cache(shared_server: Server) -> None:
    req = bpf_request(script_text=_unique("cached"), privilege="stapusr")
    first = _compile(shared_server, req)
    second = _compile(shared_server, req)
    assert (first.cached, second.cached) == (False, True)
    assert first.module == second.module
    assert second.signature == first.signature
    different = _compile(shared_server, dataclasses.replace(req, options=("-w",)))
    assert not different.cached

    script_hash = hashlib.sha256(req.script_text.encode()).hexdigest()[:16]
    lines = shared_server.log_lines(script_hash, count=3)
    # One line per request; each is logged after its answer, so not always in order.
    assert sorted("cached=yes" in line for line in lines) == [False, False, True]
    assert all("status=200" in line and "duration=" in line for line in lines)


# --- limits ---------------------------------------------------------------------------------


def _raw_tls(server: Server) -> ssl.SSLSocket:
    raw = socket.create_connection((HOST, server.port), timeout=10)
    return server.tls_context().wrap_socket(raw)


def _read_status(tls: ssl.SSLSocket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(4096)
        if not chunk:
            break
        data += chunk
    head = data.partition(b"\r\n\r\n")[0]
    return int(head.split()[1]), head


def test_oversized_request_gets_413_without_being_read(shared_server: Server) -> None:
    # Headers only: answering at once proves the 10 MB body was never waited for.
    with _raw_tls(shared_server) as tls:
        started = time.monotonic()
        tls.sendall(b"POST /compile HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        status, _ = _read_status(tls)
        assert status == 413
        assert time.monotonic() - started < 1.5  # well under the 2 s I/O timeout

    with _raw_tls(shared_server) as tls:
        tls.sendall(
            b"POST /compile HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        status, head = _read_status(tls)
        assert status == 413  # not "100 Continue"
        assert b"100 Continue" not in head


def test_silent_client_is_dropped_without_holding_the_server(shared_server: Server) -> None:
    with socket.create_connection((HOST, shared_server.port), timeout=10) as silent:
        client = f"client={HOST}:{silent.getsockname()[1]} "
        started = time.monotonic()
        # Meanwhile, others are served.
        assert shared_server.get("/").status == 200
        with contextlib.suppress(ConnectionResetError):
            assert silent.recv(1) == b""
        waited = time.monotonic() - started
    assert 1.5 < waited < 6  # IO_TIMEOUT=2
    [line] = shared_server.log_lines(client)
    assert 'result="tls-failed: timeout"' in line
    assert "dropped: no complete request" in line


def test_trickling_client_is_cut_off_at_the_deadline(shared_server: Server) -> None:
    # A header byte every 0.2 s keeps each read well inside the 2 s I/O timeout;
    # the deadline for the whole request still ends it.
    request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    with _raw_tls(shared_server) as tls:
        client = f"client={HOST}:{tls.getsockname()[1]} "
        started = time.monotonic()
        for byte in request:
            try:
                tls.sendall(bytes([byte]))
                readable, _, _ = select.select([tls], [], [], 0.2)
                if readable and tls.recv(1) == b"":
                    break
            except OSError:
                break
        waited = time.monotonic() - started
    assert 1.5 < waited < 6
    [line] = shared_server.log_lines(client)
    assert "dropped: no complete request" in line


def test_more_requests_than_workers_wait_or_get_503(
    server_factory: ServerFactory, base_dir: Path
) -> None:
    slow = stap_wrapper(base_dir, "stap-slow-1s", "sleep 1")
    server = server_factory(
        MAX_COMPILES="1",
        QUEUE_SIZE="1",
        QUEUE_TIMEOUT="20",
        STAP=str(slow),
        MAX_CONNECTIONS_PER_CLIENT="8",  # all five come from this host
    )
    server.start()
    with ThreadPoolExecutor(max_workers=5) as pool:
        replies = list(
            pool.map(lambda i: server.compile(bpf_request(_unique(f"queue{i}"))), range(5))
        )
    statuses = sorted(r.status for r in replies)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2  # one compiled at once, one after waiting
    assert statuses.count(503) >= 1
    for reply in replies:
        if reply.status == 503:
            assert reply.headers["Retry-After"].isdigit()
            assert "busy" in decode_error(reply.body)
        else:
            assert decode_compile_response(reply.body).status == 0
    assert server.get("/").status == 200  # still serving
    assert server.log_lines("result=busy")


def test_large_eval_script_and_oversized_options_get_answers(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    server.start()
    # More than one command-line argument may hold (128 KiB): still compiled.
    big = "probe begin { exit() }\n" + "".join(f"# {i:06d} {'x' * 90}\n" for i in range(2100))
    assert len(big) > 200_000
    resp = _compiled(server, script_text=big, script_name=None, eval=True)
    assert resp.status == 0, resp.stderr
    assert resp.module is not None and resp.module.name.endswith(".bo")
    # An option that long cannot be passed on at all: a one-line answer, not a 500.
    reply = server.compile(
        bpf_request(script_text=_unique("long-E"), options=("-E", "#" * 200_000))
    )
    assert reply.status == 200, reply.body
    failed = decode_compile_response(reply.body)
    assert failed.status == 1
    assert failed.stderr == "stap-server: cannot run stap: Argument list too long\n"
    assert "Traceback" not in server.log_text()


def _counting_stap(base_dir: Path, name: str, seconds: float) -> tuple[Path, Path]:
    """A stap that records each compile in a file and takes ``seconds`` longer."""
    record = base_dir / "recorded"
    record.mkdir(mode=0o777, exist_ok=True)
    record.chmod(0o777)
    counter = record / f"{name}.count"
    counter.unlink(missing_ok=True)
    return stap_wrapper(base_dir, name, f"echo compile >> {counter}; sleep {seconds}"), counter


def _same_request_three_times(server: Server, req: CompileRequest) -> list[Reply]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda _: server.compile(req), range(3)))


def test_identical_requests_beyond_the_limits_get_503(
    server_factory: ServerFactory, base_dir: Path
) -> None:
    stap, counter = _counting_stap(base_dir, "stap-count-503", 2)
    # Unsandboxed, so that the counting stap can write its record outside its compile.
    server = server_factory(MAX_COMPILES="1", QUEUE_SIZE="0", STAP=str(stap), SANDBOX="no")
    server.start()
    started = time.monotonic()
    replies = _same_request_three_times(server, bpf_request(_unique("same-503")))
    assert sorted(r.status for r in replies) == [200, 503, 503]
    assert time.monotonic() - started < 10  # the two refused at once, not after compiling
    assert counter.read_text() == "compile\n"
    for reply in replies:
        if reply.status == 503:
            assert reply.headers["Retry-After"].isdigit()


def test_identical_requests_share_one_compile_even_a_failed_one(
    server_factory: ServerFactory, base_dir: Path
) -> None:
    stap, counter = _counting_stap(base_dir, "stap-count-shared", 2)
    server = server_factory(MAX_COMPILES="1", QUEUE_SIZE="4", STAP=str(stap), SANDBOX="no")
    server.start()
    req = bpf_request(f'# {time.time_ns()}\nprobe begin {{ println(1 + "a") }}\n')
    started = time.monotonic()
    replies = _same_request_three_times(server, req)
    elapsed = time.monotonic() - started
    assert [r.status for r in replies] == [200, 200, 200]
    answers = [decode_compile_response(r.body) for r in replies]
    assert {(a.status, a.stderr) for a in answers} == {(answers[0].status, answers[0].stderr)}
    assert answers[0].status != 0 and "type mismatch" in answers[0].stderr
    assert counter.read_text() == "compile\n"  # compiled once, not three times in a row
    assert elapsed < 6  # one 2 s compile, not three
    script_hash = hashlib.sha256(req.script_text.encode()).hexdigest()[:16]
    lines = server.log_lines(script_hash, count=3)
    assert sorted(line.split("cached=")[1].split()[0] for line in lines) == [
        "no",
        "shared",
        "shared",
    ]
    assert any("shared_with=2" in line for line in lines)


def test_compile_runs_as_service_user_under_a_memory_limit(
    server_factory: ServerFactory, base_dir: Path
) -> None:
    # What the wrapper says on stderr comes back in the answer.
    wrapper = stap_wrapper(
        base_dir,
        "stap-record",
        'echo "uid=$(id -u)" >&2; grep "Max address space" /proc/self/limits >&2',
    )
    server = server_factory(STAP=str(wrapper), COMPILE_MEMORY="1G")
    # As root with --allow-root the server keeps root, but stap still drops to the user.
    server.start("--allow-root")
    assert _uid_of(server.pid()) == 0
    resp = _compiled(server, script_text=_unique("limits"))
    assert resp.status == 0, resp.stderr
    [uid] = [line for line in resp.stderr.splitlines() if line.startswith("uid=")]
    [limit] = [line for line in resp.stderr.splitlines() if "Max address space" in line]
    assert uid == f"uid={ensure_service_user().pw_uid}"
    assert limit.split()[3:5] == [str(1024**3), str(1024**3)]


def test_compile_wall_time_limit_kills_the_process_group(
    server_factory: ServerFactory, base_dir: Path
) -> None:
    marker = "31.25"  # an unusual sleep length to find stragglers by
    wrapper = stap_wrapper(base_dir, "stap-hang", f"sleep {marker}")
    server = server_factory(STAP=str(wrapper), COMPILE_TIMEOUT="1")
    server.start()
    started = time.monotonic()
    resp = _compiled(server, script_text=_unique("hang"))
    assert time.monotonic() - started < 5
    assert resp.status != 0
    assert "time limit of 1 s" in resp.stderr
    time.sleep(0.2)
    stragglers = [
        p.name
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _cmdline(p) == ["sleep", marker]
    ]
    assert stragglers == []


def _cmdline(proc_dir: Path) -> list[str]:
    try:
        return (proc_dir / "cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def test_key_readable_by_others_stops_the_start(server_factory: ServerFactory) -> None:
    server = server_factory()
    server.cert_path.parent.mkdir(parents=True)
    generate_identity(server.key_path, server.cert_path, "localhost")
    server.key_path.chmod(0o644)

    proc = server.command("start")
    assert proc.returncode == 6
    assert proc.stderr.count("\n") == 1
    assert f"private key {server.key_path} is group- or world-accessible (mode 0644)" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert server.command("status").returncode == 3


def test_key_of_the_service_user_is_refused_as_exposed(server_factory: ServerFactory) -> None:
    """The layout of earlier versions: state and identity owned by the service user."""
    server = server_factory()
    user = ensure_service_user()
    server.cert_path.parent.mkdir(parents=True)
    generate_identity(server.key_path, server.cert_path, "localhost")
    for path in [server.state_dir, *server.state_dir.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)

    proc = server.command("start")
    assert proc.returncode == 6
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"private key {server.key_path} belongs to uid {user.pw_uid}, not to root" in (
        proc.stderr
    )
    assert "consider the key exposed" in proc.stderr
    # The directories were taken back from the service user; the key was left alone.
    assert server.cert_path.parent.stat().st_uid == 0
    assert server.key_path.stat().st_uid == user.pw_uid
    os.chown(server.key_path, 0, 0)
    os.chown(server.cert_path, 0, 0)
    server.start()
    assert server.get("/").status == 200


def test_server_certificate_is_practical(shared_server: Server) -> None:
    cert = load_certificate(shared_server.cert_path)
    lifetime = not_valid_after(cert) - not_valid_before(cert)
    assert lifetime.days >= 5 * 365
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
