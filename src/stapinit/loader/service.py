"""The ``stap-loader`` service: accept clients, judge, run modules, stream their output.

Each connection is one module.  The caller is identified by the kernel
(``SO_PEERCRED``) and their groups by the group database, never by anything the
client says; the module arrives as bytes and is written into a private directory,
so no client-supplied path ever reaches ``stapbpf``/``staprun``.

Local users cannot tie the service up: connections beyond the session limits
are closed as they are accepted (so the thread count is bounded), users in none
of the stap groups are refused before a byte of their request is read, and the
whole request must arrive within ``io_timeout`` seconds.
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
from typing import Final

from stapinit.core.runtime import KIND_OF_SUFFIX
from stapinit.core.system import SYSTEM_PATH
from stapinit.loader import wire
from stapinit.loader.config import ConfigError, LoaderConfig, resolve_tool
from stapinit.loader.policy import (
    Caller,
    Decision,
    Host,
    Level,
    SignatureStatus,
    caller_level,
    may_load,
    must_check_user_space,
    ordinary_refusal,
)
from stapinit.protocol import MAX_MODULE_BYTES
from stapinit.trust.bpfelf import user_space_probes
from stapinit.trust.signing import Manifest, SignatureError, verify_module
from stapinit.trust.stores import TrustStore, signer_store_at

#: Environment of the tools we run: nothing inherited from whoever started us.
CHILD_ENV: Final = {"PATH": SYSTEM_PATH}
#: A module plus its signature file; signatures are small JSON.
MAX_REQUEST: Final = MAX_MODULE_BYTES + 64 * 1024
#: Seconds between two log lines about refusals that cost the caller nothing.
_REFUSAL_LOG_RATE: Final = 1.0

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
    """Name, groups and primary group of ``uid`` from the system's databases.

    Raises KeyError for a uid the user database does not know.
    """
    entry = pwd.getpwuid(uid)
    names: set[str] = set()
    for gid in os.getgrouplist(entry.pw_name, entry.pw_gid):
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(gid).gr_name)
    return Caller(uid, entry.pw_name, frozenset(names), entry.pw_gid)


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
    probes: list[str] = []
    if check.status == "valid" and must_check_user_space(caller, req.module_name):
        try:
            probes = user_space_probes(req.module)
        except ValueError as exc:
            return Decision(False, f"module {req.module_name} cannot be examined: {exc}")
    return may_load(
        caller,
        req.module_name,
        check.manifest,
        check.status,
        this_host(),
        check.detail,
        user_space_probes=probes,
    )


def runner_env(caller: Caller, runtime: str) -> dict[str, str]:
    """The environment of the tool that runs ``caller``'s module.

    A kernel module below stapdev is confined by SystemTap's runtime to the
    processes of the uid that loaded it (its real uid at load time).  staprun is
    meant to be setuid root and run by that user; run by root it takes the user
    from ``SYSTEMTAP_REAL_UID``/``SYSTEMTAP_REAL_GID`` instead (staprun 4.8 sets
    its real uid and gid from them right after its own permission checks, which
    root passes, before inserting the module).  Setting the real uid before
    staprun starts would not do: staprun would then demand its own NSS module
    signature or a module under ``/lib/modules/$(uname -r)/systemtap``.
    """
    env = dict(CHILD_ENV)
    level = caller_level(caller.uid, caller.groups)
    if runtime == "kmod" and level is not None and level < Level.STAPDEV:
        env["SYSTEMTAP_REAL_UID"] = str(caller.uid)
        if caller.gid is not None:
            env["SYSTEMTAP_REAL_GID"] = str(caller.gid)
    return env


# --- running -----------------------------------------------------------------------


@dataclass
class Children:
    """The modules running now, so that a stopping service can stop them too."""

    procs: set[subprocess.Popen[bytes]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        """Track ``proc``; once the service is stopping, stop it at once instead."""
        with self.lock:
            if not self.closed:
                self.procs.add(proc)
                return
        _signal_group(proc, signal.SIGTERM)

    def discard(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop tracking ``proc``."""
        with self.lock:
            self.procs.discard(proc)

    def stop_all(self, timeout: float) -> None:
        """SIGTERM every child, then SIGKILL those still running after ``timeout``."""
        with self.lock:
            self.closed = True
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


def spawn(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a module's runner in its own session, with exactly ``env``."""
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def stream(
    proc: subprocess.Popen[bytes], conn: socket.socket, stop_timeout: float, children: Children
) -> int:
    """Forward ``proc``'s output to ``conn`` until it ends; stop it when the client stops.

    The client stops the module by shutting down its side (EOF) or by vanishing
    (a failed send): the child then gets SIGTERM, so its ``end`` probes run, and
    SIGKILL if it is still there ``stop_timeout`` seconds later.
    """
    children.add(proc)
    assert proc.stdout is not None and proc.stderr is not None
    client_alive = True
    deadline: float | None = None  # when to escalate, once stopping
    killed = False

    def stop() -> None:
        nonlocal deadline
        if deadline is None:
            _signal_group(proc, signal.SIGTERM)
            deadline = time.monotonic() + stop_timeout

    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
            sel.register(conn, selectors.EVENT_READ, "client")
            pipes = 2
            while pipes:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
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
                if deadline is not None and time.monotonic() >= deadline:
                    if killed:
                        break  # something outside its group holds the pipes: stop waiting
                    _signal_group(proc, signal.SIGKILL)
                    killed = True
                    deadline = time.monotonic() + 1.0
            try:
                returncode = proc.wait(stop_timeout)
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
    return wire.exit_status(returncode)


def _refuse(conn: socket.socket, reason: str) -> None:
    """Send a refusal and end the connection without reading whatever else comes.

    The refusal is queued at the client before the close, and a Unix socket
    delivers queued data before reporting the reset that unread data causes, so
    the client reads the refusal (stap-client does so even when its own sending
    failed).  The frame is small; a client that never reads does not hold us.
    """
    with contextlib.suppress(OSError):
        conn.settimeout(1.0)
        conn.sendall(wire.refused(reason))
        conn.shutdown(socket.SHUT_RDWR)


# --- one session -------------------------------------------------------------------


@dataclass
class Service:
    """The loader's state shared by its sessions."""

    config: LoaderConfig
    log: Log = log_stderr
    children: Children = field(default_factory=Children)
    _sessions: dict[int, int] = field(init=False, default_factory=dict)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _wake_r: int = field(init=False)
    _wake_w: int = field(init=False)
    _last_refusal_log: float = field(init=False, default=0.0)
    _unlogged_refusals: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        # A pipe, so that a signal handler can wake the accept loop at once.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def signer_store(self) -> TrustStore:
        """The signer store, re-read for every request so authorizations apply at once."""
        return signer_store_at(self.config.signer_store)

    def _admit(self, uid: int) -> str | None:
        """Count a session for ``uid``; the reason it is refused, if it is."""
        with self._lock:
            if sum(self._sessions.values()) >= self.config.max_sessions:
                return "stap-loader is busy; try again later"
            if self._sessions.get(uid, 0) >= self.config.max_sessions_per_user:
                return f"you already run {self.config.max_sessions_per_user} modules"
            self._sessions[uid] = self._sessions.get(uid, 0) + 1
            return None

    def _leave(self, uid: int) -> None:
        with self._lock:
            self._sessions[uid] -= 1
            if not self._sessions[uid]:
                del self._sessions[uid]

    def _log_refusal(self, message: str) -> None:
        """Log a refusal that costs a caller nothing, at most about once a second.

        Over-limit connections and users in none of the stap groups can be made
        in a loop; the lines left out are counted in the next one.
        """
        with self._lock:
            now = time.monotonic()
            if now - self._last_refusal_log < _REFUSAL_LOG_RATE:
                self._unlogged_refusals += 1
                return
            more = self._unlogged_refusals
            self._last_refusal_log, self._unlogged_refusals = now, 0
        self.log(message + (f" (and {more} more refusals not logged)" if more else ""))

    def accept_one(self, listener: socket.socket) -> None:
        """Accept a connection and either start its session or refuse it at once.

        Runs in the accept loop: nothing here may block on the client.
        """
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and the like: the client is dropped, we go on
            self.log(f"cannot accept a connection: {exc.strerror}")
            time.sleep(0.05)
            return
        try:
            uid = peer_uid(conn)
        except OSError as exc:
            self.log(f"cannot identify a caller: {exc.strerror}")
            conn.close()
            return
        refusal = self._admit(uid)
        if refusal is not None:
            self._log_refusal(f"uid {uid}: refused: {refusal}")
            with contextlib.suppress(OSError):
                conn.send(wire.refused(refusal), socket.MSG_DONTWAIT)
            conn.close()
            return
        try:
            threading.Thread(target=self.handle, args=(conn, uid), daemon=True).start()
        except RuntimeError as exc:  # no more threads: the limits are set too high
            self._leave(uid)
            conn.close()
            self.log(f"uid {uid}: cannot start a session: {exc}")

    def handle(self, conn: socket.socket, uid: int) -> None:
        """Serve one admitted connection to its end; never raises."""
        with conn:
            try:
                conn.setblocking(True)
                self._session(conn, uid)
            except Exception as exc:  # a broken session must not take the service down
                self.log(f"uid {uid}: session failed: {exc!r}")
            finally:
                self._leave(uid)

    def _session(self, conn: socket.socket, uid: int) -> None:
        deadline = time.monotonic() + self.config.io_timeout
        try:
            caller = caller_from_uid(uid)
        except KeyError:
            self._log_refusal(f"uid {uid}: refused: unknown user")
            _refuse(conn, f"uid {uid} is not a known user")
            return
        who = f"{caller.name} (uid {uid})"
        if caller_level(uid, caller.groups) is None:
            # Before reading anything: they may never load, so their bytes are not wanted.
            self._log_refusal(f"{who}: refused: in none of the stap groups")
            _refuse(conn, ordinary_refusal(caller.name))
            return
        try:
            frame = wire.read_frame(conn, MAX_REQUEST, deadline)
            if frame is None:
                return
            req = wire.parse_load_request(frame)
        except TimeoutError:
            limit = f"{self.config.io_timeout:g}"
            self.log(f"{who}: refused: request not complete within {limit} s")
            _refuse(conn, f"bad request: not complete within {limit} seconds")
            return
        except wire.WireError as exc:
            self.log(f"{who}: bad request: {exc}")
            _refuse(conn, f"bad request: {exc}")
            return
        del frame  # the module now lives in req alone
        conn.settimeout(self.config.io_timeout)  # from now on: for each piece of output
        decision = judge(caller, req, self.signer_store())
        verdict = "loading" if decision.allowed else "refused"
        self.log(f"{who}: {req.module_name}: {verdict}: {decision.reason}")
        if not decision.allowed:
            _refuse(conn, decision.reason)
            return
        runtime = KIND_OF_SUFFIX[Path(req.module_name).suffix]
        try:
            tool = resolve_tool(self.config.stapbpf if runtime == "bpf" else self.config.staprun)
        except ConfigError as exc:
            self.log(f"cannot run {req.module_name}: {exc}")
            _refuse(conn, f"stap-loader cannot run {req.module_name}: {exc}")
            return
        with tempfile.TemporaryDirectory(prefix="stap-loader-") as tmp:
            workdir = Path(tmp)  # mode 0700, root's: nobody else can swap the module
            module_path = workdir / req.module_name
            module_path.write_bytes(req.module)
            module_name = req.module_name
            del req  # no need to hold the module in memory while it runs
            try:
                proc = spawn([tool, str(module_path)], workdir, runner_env(caller, runtime))
            except OSError as exc:
                self.log(f"cannot run {tool}: {exc}")
                _refuse(conn, f"stap-loader cannot run {tool}: {exc.strerror}")
                return
            # A client already gone is noticed by stream(), which then stops the module.
            with contextlib.suppress(OSError):
                conn.sendall(wire.started(decision.reason))
            status = stream(proc, conn, self.config.stop_timeout, self.children)
        self.log(f"{who}: {module_name}: exited with status {status}")
        with contextlib.suppress(OSError):
            conn.sendall(wire.exited(status))

    def serve(self, listener: socket.socket) -> None:
        """Accept connections until :meth:`stop` is called.

        Admission happens here, so at most ``max_sessions`` session threads exist.
        """
        listener.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ, "listener")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            while True:
                for key, _ in sel.select():
                    if key.data == "wake":
                        return
                    self.accept_one(listener)

    def stop(self) -> None:
        """Make :meth:`serve` return; safe to call from a signal handler."""
        os.write(self._wake_w, b"x")


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
    caller may do.  A stale socket left by a previous run is replaced; a live
    one, or any other file in the way, is an error.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ServiceError(f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(path)) == 0:
                raise ServiceError(f"another stap-loader is listening on {path}")
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
