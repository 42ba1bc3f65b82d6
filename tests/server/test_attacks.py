"""Attacks on a real stap-server from the network, performed for real (issue 10, #4 #6 #9).

Each test runs the attack against a running server on loopback and checks
that it fails: a compile cannot read the server's files or probe for their
existence, one source of idle connections cannot lock others out, and hostile
bytes get a one-line refusal, never a traceback or a 500.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stapinit.protocol import decode_compile_response, decode_error, encode_compile_request
from tests.server.conftest import ServerFactory
from tests.server.helpers import HOST, Server, bpf_request, stap_wrapper

SECRET = "TOP-SECRET-LINE-7f3a"


def _unique(tag: str) -> str:
    return f"# {tag} {time.time_ns()}\n"


def _cast_script(header: str) -> str:
    return (
        _unique("cast")
        + f'probe begin {{ printf("%d\\n", @cast(0, "task_struct", "{header}")->pid); exit() }}\n'
    )


@pytest.fixture(scope="module")
def secret_file(base_dir: Path) -> Path:
    """A file the service user may read, outside everything a compile needs."""
    directory = base_dir / "secrets"
    directory.mkdir(mode=0o755, exist_ok=True)
    path = directory / "secret.txt"
    path.write_text(f"{SECRET}\n")
    path.chmod(0o644)
    return path


def _compile_output(server: Server, script: str, privilege: str = "stapdev") -> str:
    reply = server.compile(bpf_request(script_text=script, privilege=privilege), timeout=120)
    assert reply.status == 200, reply.body
    resp = decode_compile_response(reply.body)
    assert resp.module is None
    return resp.stdout + resp.stderr


def _masked(output: str, path: str) -> str:
    """The output with the path named and the script's unique comment taken out."""
    lines = [line for line in output.replace(path, "PATH").splitlines() if "# cast" not in line]
    return "\n".join(lines)


# --- #4: what a compile can see -----------------------------------------------------------


def test_stapusr_header_arguments_are_refused_before_stap_runs(
    shared_server: Server, secret_file: Path
) -> None:
    for header in (f"<{secret_file}>", f"kernel<{secret_file}>", f"kernel:<{secret_file}>"):
        reply = shared_server.compile(
            bpf_request(script_text=_cast_script(header), privilege="stapusr")
        )
        assert reply.status == 400
        message = decode_error(reply.body)
        assert "header files" in message and "--privilege=stapusr" in message
        assert SECRET not in message


def test_a_compile_cannot_read_the_servers_files_through_gcc(
    shared_server: Server, secret_file: Path
) -> None:
    """stapdev may name headers, but gcc finds nothing of the server's or the host's files."""
    # Something the service user can read, and the server's own log and state.
    shared_server.get("/")  # so that the log has a line about a client
    targets = [secret_file, shared_server.log_file, shared_server.cert_path, Path("/etc/hostname")]
    for target in targets:
        assert target.exists()
        output = _compile_output(shared_server, _cast_script(f"<{target}>"))
        assert f"{target}: No such file or directory" in output
        assert SECRET not in output
        assert "client=" not in output  # no line of the request log
        assert "BEGIN CERTIFICATE" not in output


def test_no_existence_oracle(shared_server: Server, base_dir: Path) -> None:
    """An existing unreadable file and a missing one give the same answer."""
    hidden = base_dir / "secrets" / "root-only.txt"
    hidden.parent.mkdir(mode=0o755, exist_ok=True)
    hidden.write_text(f"{SECRET}\n")
    hidden.chmod(0o600)
    missing = base_dir / "secrets" / "no-such-file.txt"
    answers = [
        _masked(_compile_output(shared_server, _cast_script(f"<{path}>")), str(path))
        for path in (hidden, missing)
    ]
    assert answers[0] == answers[1]
    assert "PATH: No such file or directory" in answers[0]


def test_without_the_sandbox_the_same_attack_reads_the_file(
    server_factory: ServerFactory, secret_file: Path
) -> None:
    """What the sandbox prevents (SANDBOX=no says so at every start)."""
    server = server_factory(SANDBOX="no")
    server.start()
    output = _compile_output(server, _cast_script(f"<{secret_file}>"))
    assert SECRET in output
    assert "SANDBOX=no: compiles are not sandboxed" in server.log_text()


def test_what_a_compile_sees(server_factory: ServerFactory, base_dir: Path) -> None:
    """A stap that looks around before compiling: only what a compile needs is there."""
    looks = (
        'for p in /home /root /var /run /srv /etc/shadow /etc/passwd "$STATE" "$LOGDIR"; do '
        '[ -e "$p" ] && echo "SEEN $p" >&2; done; '
        'echo "CWD $(pwd)" >&2; echo "PIDS $(ls /proc | grep -c "^[0-9]")" >&2; '
        'echo "NET $(cat /proc/net/dev | wc -l)" >&2; '
        'touch /usr/bin/stap-sandbox-probe 2>/dev/null && echo "WROTE /usr" >&2; '
        'test -r /lib/modules/"$(uname -r)" || echo "NO MODULES" >&2'
    )
    placeholder = stap_wrapper(base_dir, "stap-look", "true")
    server = server_factory(STAP=str(placeholder))
    body = looks.replace("$STATE", str(server.state_dir)).replace(
        "$LOGDIR", str(server.log_file.parent)
    )
    stap_wrapper(base_dir, "stap-look", body)
    server.start()
    output = _compile_output_ok(server)
    assert "SEEN" not in output
    assert "CWD <tmpdir>/build" in output
    pids = int(output.split("PIDS ")[1].split()[0])
    assert pids <= 6  # bwrap, the shell, ls, grep: not the host's processes
    assert "NET 3" in output  # /proc/net/dev: two header lines and lo only
    assert "WROTE" not in output
    assert not Path("/usr/bin/stap-sandbox-probe").exists()


def _compile_output_ok(server: Server) -> str:
    reply = server.compile(bpf_request(script_text=_unique("look") + "probe begin { exit() }\n"))
    assert reply.status == 200, reply.body
    resp = decode_compile_response(reply.body)
    assert resp.status == 0, resp.stderr
    return resp.stderr


def test_a_sandbox_that_cannot_work_stops_the_start(
    server_factory: ServerFactory, base_dir: Path
) -> None:
    """No unprivileged user namespaces (a bwrap that says so): start fails loudly."""
    fake = base_dir / "no-userns-bin"
    fake.mkdir(mode=0o755, exist_ok=True)
    (fake / "bwrap").write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n"
    )
    (fake / "bwrap").chmod(0o755)
    for tool in ("prlimit", "stap"):
        found = shutil.which(tool)
        assert found is not None
        with contextlib.suppress(FileExistsError):
            (fake / tool).symlink_to(found)
    server = server_factory()
    proc = server.command_with_env("start", env={"PATH": str(fake)})
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "the compile sandbox does not work here" in proc.stderr
    assert "No permissions to creating new namespace" in proc.stderr
    assert "SANDBOX=no" in proc.stderr
    assert server.command("status").returncode == 3
    (fake / "bwrap").unlink()
    missing = server.command_with_env("start", env={"PATH": str(fake)})
    assert missing.returncode == 5
    assert "cannot find bwrap" in missing.stderr and "install bubblewrap" in missing.stderr


# --- #6: one source cannot lock everyone out -----------------------------------------------


def _idle_connections(source: str, port: int, count: int) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect((HOST, port))
        held.append(sock)
    return held


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_idle_connections_from_one_source_do_not_lock_others_out(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(
        MAX_CONNECTIONS="16", MAX_CONNECTIONS_PER_CLIENT="4", HANDSHAKE_TIMEOUT="2"
    )
    server.start()
    # Another address of this host: 127.0.0.2 is loopback too.
    held = _idle_connections("127.0.0.2", server.port, 16)
    try:
        time.sleep(0.3)
        started = time.monotonic()
        assert server.get("/").status == 200  # a real client, from 127.0.0.1
        assert time.monotonic() - started < 1.5
        # Beyond its four, the attacker's connections were closed at once...
        refused = [s for s in held[4:] if _closed_by_peer(s, 0.5)]
        assert len(refused) == 12
        # ...and its four idle ones at the handshake deadline, not IO_TIMEOUT (30 s).
        assert all(_closed_by_peer(s, 3.0) for s in held[:4])
        assert time.monotonic() - started < 3.5
    finally:
        for sock in held:
            sock.close()
    drops = server.log_lines("dropped: 4 connections from 127.0.0.2 already open")
    assert len(drops) == 1  # logged once, not once per connection
    assert server.get("/").status == 200


# --- #9: hostile bytes get a clean refusal -------------------------------------------------


def _tls(server: Server) -> ssl.SSLSocket:
    raw = socket.create_connection((HOST, server.port), timeout=10)
    return server.tls_context().wrap_socket(raw)


def _exchange(server: Server, data: bytes) -> bytes:
    """Send ``data`` over TLS, then read the whole answer."""
    with _tls(server) as tls:
        with contextlib.suppress(OSError):
            tls.sendall(data)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := tls.recv(65536):
                answer += chunk
        return answer


def _post(body: bytes) -> bytes:
    head = (
        "POST /compile HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.fixture
def hardened(server_factory: ServerFactory) -> Iterator[Server]:
    server = server_factory(MAX_CONNECTIONS_PER_CLIENT="64", HANDSHAKE_TIMEOUT="2")
    server.start()
    yield server
    assert "Traceback" not in server.log_text()
    assert "internal error" not in server.log_text()
    assert server.get("/").status == 200


_VALID = json.loads(encode_compile_request(bpf_request()))


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (_post(b'{"status": ' + b"9" * 5000 + b"}"), 400, "more than 20 digits"),
        (_post(json.dumps({**_VALID, "eval": int("9" * 4000)}).encode()), 400, "20 digits"),
        (_post(b"[" * 60000 + b"]" * 60000), 400, "nested deeper"),
        (_post(b'{"script": {"name": "\\ud800x", "text": ""}}'), 400, "not valid Unicode"),
        (_post(b"\xff\xfe\xfd"), 400, "not UTF-8"),
        (_post(json.dumps({**_VALID, "options": [1, 2]}).encode()), 400, "list of strings"),
        (_post(json.dumps({**_VALID, "tapsets": "x"}).encode()), 400, "wrong type"),
        (_post(json.dumps({**_VALID, "privilege": None}).encode()), 400, "wrong type"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, ""),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431, ""),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n", 431, ""),
        (b"POST /compile HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", 400, "Content-Length"),
        (b"POST /compile HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400, ""),
        (b"GET http://[::1 HTTP/1.1\r\n\r\n", 404, "no such resource"),
        (b"GET /\xff\xfe HTTP/1.1\r\n\r\n", 404, "no such resource"),
        (b"\x00\x01\x02 garbage\r\n\r\n", 400, ""),
        (b"GET / HTTP/9.9\r\n\r\n", 505, ""),
    ],
)
def test_hostile_requests_get_a_one_line_refusal(
    hardened: Server, data: bytes, status: int, message: str
) -> None:
    answer = _exchange(hardened, data)
    assert _status(answer) == status, answer[:300]
    body = answer.partition(b"\r\n\r\n")[2]
    error = decode_error(body)
    assert message in error
    assert "\n" not in error and "Traceback" not in error


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(_post),
        st.builds(
            lambda method, path, headers: (
                method + b" " + path + b" HTTP/1.1\r\n" + b"".join(headers) + b"\r\n"
            ),
            st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"", b"G\x00T"]),
            st.binary(max_size=40),
            st.lists(st.binary(max_size=40).map(lambda h: h + b"\r\n"), max_size=5),
        ),
    )
)
def test_any_bytes_get_an_answer_or_a_close_never_a_500(hardened: Server, data: bytes) -> None:
    answer = _exchange(hardened, data)
    if answer:
        assert answer.startswith(b"HTTP/1."), answer[:100]
        assert _status(answer) != 500


# --- issue 13: the pid file's directory ----------------------------------------------------


def test_start_as_root_with_a_pid_directory_only_root_may_write(
    server_factory: ServerFactory,
) -> None:
    """Upstream's layout: /run/stap-server belongs to root; the server runs as USER."""
    server = server_factory()
    server.pid_file.parent.mkdir(mode=0o755)
    assert server.pid_file.parent.stat().st_uid == 0
    server.start()
    assert server.pid_file.stat().st_uid == 0  # written by root, not by the service user
    status = server.command("status")
    assert status.returncode == 0, status.stdout
    stop = server.command("stop")
    assert stop.returncode == 0, stop.stderr
    assert not server.pid_file.exists()


def test_pid_directory_a_non_root_starter_cannot_write_is_a_one_line_error(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    for directory in (server.state_dir, server.log_file.parent):
        directory.mkdir()
        shutil.chown(directory, "stap-server", "stap-server")
    server.pid_file.parent.mkdir(mode=0o755)  # root's
    proc = server.command_as("stap-server", "start")
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert f"cannot write pid file {server.pid_file}" in proc.stderr
    assert "set PID_FILE" in proc.stderr
    assert server.command("status").returncode == 3
