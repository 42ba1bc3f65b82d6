"""The ``stap-loader`` service: accept clients, judge, run modules, stream their output.

Each connection is one module.  The caller is identified by the kernel
(``SO_PEERCRED``) and their groups by the group database, never by anything the
client says; the module arrives as bytes and is written into a private directory,
so no client-supplied path ever reaches ``stapbpf``/``staprun``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stapinit.loader import wire
from stapinit.loader.config import ConfigError, LoaderConfig, resolve_tool
from stapinit.loader.policy import Caller, Decision, Host, SignatureStatus, may_load
from stapinit.trust.signing import Manifest, SignatureError, verify_module
from stapinit.trust.stores import TrustStore

#: Environment of the tools we run: nothing inherited from whoever started us.
CHILD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
#: A module plus its signature file; signatures are small JSON.
MAX_REQUEST = wire.MAX_MODULE_BYTES + 64 * 1024

Log = Callable[[str], None]


def log_stderr(message: str) -> None:
    """Default logger: one line on stderr (the journal, under systemd)."""
    print(f"stap-loader: {message}", file=sys.stderr, flush=True)


class ServiceError(Exception):
    """The service cannot start; ``str()`` is one line."""


# --- who is asking -----------------------------------------------------------------


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of ``conn``, from the kernel."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[1]
    return uid


def caller_from_uid(uid: int) -> Caller:
    """Name and group names of ``uid`` from the system's databases (KeyError if unknown)."""
    entry = pwd.getpwuid(uid)
    names: set[str] = set()
    for gid in os.getgrouplist(entry.pw_name, entry.pw_gid):
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(gid).gr_name)
    return Caller(uid, entry.pw_name, frozenset(names))


def this_host() -> Host:
    """The kernel release and architecture modules must have been signed for."""
    uname = os.uname()
    return Host(uname.release, uname.machine)


# --- judging -----------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureCheck:
    """Outcome of checking a module's signature against the signer store."""

    status: SignatureStatus
    manifest: Manifest | None = None
    detail: str = ""


def check_signature(req: wire.LoadRequest, store: TrustStore) -> SignatureCheck:
    """Verify ``req``'s signature against the certificates ``store`` vouches for."""
    if req.signature is None:
        return SignatureCheck("unsigned")
    warnings: list[str] = []
    certs = [c.certificate for c in store.certificates(warnings.append)]
    try:
        manifest = verify_module(req.signature, req.module, certs)
    except SignatureError as exc:
        detail = "; ".join([str(exc), *warnings])
        return SignatureCheck(exc.reason, detail=detail)
    return SignatureCheck("valid", manifest)


def judge(caller: Caller, req: wire.LoadRequest, store: TrustStore) -> Decision:
    """The policy's verdict on ``caller`` loading ``req`` on this host."""
    check = check_signature(req, store)
    return may_load(
        caller, req.module_name, check.manifest, check.status, this_host(), check.detail
    )


# --- running -----------------------------------------------------------------------


@dataclass
class Children:
    """The modules running now, so that a stopping service can stop them too."""

    procs: set[subprocess.Popen[bytes]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        """Track ``proc``."""
        with self.lock:
            self.procs.add(proc)

    def discard(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop tracking ``proc``."""
        with self.lock:
            self.procs.discard(proc)

    def stop_all(self, timeout: float) -> None:
        """SIGTERM every child, then SIGKILL those still running after ``timeout``."""
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The child leads its own session, so this reaches anything it started too.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def exit_status(returncode: int) -> int:
    """A shell-style exit status: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def run_streaming(
    argv: list[str], cwd: Path, conn: socket.socket, stop_timeout: float, children: Children
) -> int:
    """Run ``argv``, forwarding its output to ``conn``; stop it when the client stops.

    The client stops the module by shutting down its side (EOF) or by vanishing
    (a failed send): the child then gets SIGTERM, so its ``end`` probes run, and
    SIGKILL if it is still there ``stop_timeout`` seconds later.
    """
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=CHILD_ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    children.add(proc)
    assert proc.stdout is not None and proc.stderr is not None
    client_alive = True
    kill_at: float | None = None

    def stop() -> None:
        nonlocal kill_at
        if kill_at is None:
            _signal_group(proc, signal.SIGTERM)
            kill_at = time.monotonic() + stop_timeout

    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
            sel.register(conn, selectors.EVENT_READ, "client")
            pipes = 2
            while pipes:
                timeout = None if kill_at is None else max(0.0, kill_at - time.monotonic())
                for key, _ in sel.select(timeout):
                    if key.data == "client":
                        try:
                            gone = not conn.recv(4096)
                        except OSError:
                            gone = True
                        if gone:
                            sel.unregister(conn)
                            stop()
                        continue
                    chunk = os.read(key.fd, wire.MAX_OUTPUT_CHUNK)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        pipes -= 1
                    elif client_alive:
                        try:
                            conn.sendall(wire.output(key.data, chunk))
                        except OSError:
                            client_alive = False
                            stop()
                if kill_at is not None and time.monotonic() >= kill_at:
                    _signal_group(proc, signal.SIGKILL)
            try:
                returncode = proc.wait(stop_timeout if kill_at is None else 1.0)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                returncode = proc.wait()
    finally:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        children.discard(proc)
    return exit_status(returncode)


# --- one session -------------------------------------------------------------------


@dataclass
class Service:
    """The loader's state shared by its sessions."""

    config: LoaderConfig
    log: Log = log_stderr
    children: Children = field(default_factory=Children)
    slots: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self.slots = threading.BoundedSemaphore(self.config.max_sessions)

    def signer_store(self) -> TrustStore:
        """The signer store, re-read for every request so authorizations apply at once."""
        return TrustStore(self.config.signer_store, frozenset({0}), "signer trust store")

    def handle(self, conn: socket.socket) -> None:
        """Serve one client connection to its end; never raises."""
        with conn:
            if not self.slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    conn.sendall(wire.refused("stap-loader is busy; try again later"))
                return
            try:
                self._session(conn)
            except Exception as exc:  # a broken session must not take the service down
                self.log(f"session failed: {exc!r}")
            finally:
                self.slots.release()

    def _session(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        try:
            caller = caller_from_uid(uid)
        except KeyError:
            self.log(f"uid {uid}: refused: unknown user")
            conn.sendall(wire.refused(f"uid {uid} is not a known user"))
            return
        conn.settimeout(self.config.io_timeout)
        try:
            frame = wire.read_frame(conn, MAX_REQUEST)
            if frame is None:
                return
            req = wire.parse_load_request(frame)
        except (wire.WireError, TimeoutError) as exc:
            self.log(f"{caller.name} (uid {uid}): bad request: {exc}")
            with contextlib.suppress(OSError):
                conn.sendall(wire.refused(f"bad request: {exc}"))
            return
        decision = judge(caller, req, self.signer_store())
        verdict = "loading" if decision.allowed else "refused"
        self.log(f"{caller.name} (uid {uid}): {req.module_name}: {verdict}: {decision.reason}")
        if not decision.allowed:
            conn.sendall(wire.refused(decision.reason))
            return
        runtime = wire.RUNTIME_BY_SUFFIX[Path(req.module_name).suffix]
        try:
            tool = resolve_tool(self.config.stapbpf if runtime == "bpf" else self.config.staprun)
        except ConfigError as exc:
            self.log(f"cannot run {req.module_name}: {exc}")
            conn.sendall(wire.refused(f"stap-loader cannot run {req.module_name}: {exc}"))
            return
        with tempfile.TemporaryDirectory(prefix="stap-loader-") as tmp:
            workdir = Path(tmp)  # mode 0700, root's: nobody else can swap the module
            module_path = workdir / req.module_name
            module_path.write_bytes(req.module)
            conn.sendall(wire.started(decision.reason))
            status = run_streaming(
                [tool, str(module_path)],
                workdir,
                conn,
                self.config.stop_timeout,
                self.children,
            )
        self.log(f"{caller.name} (uid {uid}): {req.module_name}: exited with status {status}")
        with contextlib.suppress(OSError):
            conn.sendall(wire.exited(status))

    def serve(self, listener: socket.socket, stopping: threading.Event) -> None:
        """Accept connections until ``stopping`` is set, one thread per connection."""
        listener.settimeout(0.5)  # so that ``stopping`` is noticed
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()


# --- the listening socket ----------------------------------------------------------


def systemd_listener(environ: dict[str, str]) -> socket.socket | None:
    """The socket systemd passed us (socket activation), if any."""
    if environ.get("LISTEN_PID") != str(os.getpid()) or environ.get("LISTEN_FDS") != "1":
        return None
    sock = socket.socket(fileno=3)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ServiceError("the socket passed by systemd is not a Unix stream socket")
    return sock


def bind_listener(path: Path) -> socket.socket:
    """Listen on a Unix socket at ``path`` that every user may connect to (mode 0666).

    Anyone may connect because the policy, not the file mode, decides what a
    caller may do.  A stale socket left by a previous run is replaced; any other
    file in the way is an error.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ServiceError(f"{path} exists and is not a socket")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o666)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ServiceError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock
