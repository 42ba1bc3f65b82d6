"""The loader's sessions: admission, one thread per connection, one module per session.

Each connection is one module.  The caller is identified by the kernel
(:mod:`.callers`), never by anything the client says; the module arrives as
bytes into a private directory (:mod:`.spool`), so no client-supplied path ever
reaches ``stapbpf``/``staprun``; :mod:`.verdict` decides; :mod:`.runner` runs it.

Local users cannot tie the loader up: connections beyond the session limits
are closed as they are accepted (so the thread count is bounded), users in none
of the stap groups are refused before a byte of their request is read, the
whole request must arrive within ``io_timeout`` seconds, and the bytes of
modules held at once are bounded by ``spool_limit``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Final

from stapinit import loader_wire as wire
from stapinit.core.runtime import kind_of_module
from stapinit.core.tools import private_workdir, tool_for_root
from stapinit.loader.callers import caller_from_uid, peer_uid
from stapinit.loader.config import LoaderConfig
from stapinit.loader.policy import Caller, caller_level, ordinary_refusal
from stapinit.loader.runner import Children, ChildrenClosed, runner_env, stream
from stapinit.loader.spool import Holding, SpoolBudget, SpooledRequest, SpoolFull, receive_request
from stapinit.loader.verdict import judge
from stapinit.protocol import MAX_MODULE_BYTES
from stapinit.trust.stores import TrustStore, signer_store_at

LOG: Final = logging.getLogger("stap-loader")
#: Seconds between two log lines about refusals that cost the caller nothing.
_REFUSAL_LOG_RATE: Final = 1.0


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


class Sessions:
    """The loader's state shared by its sessions: limits, running modules, the accept loop."""

    def __init__(self, config: LoaderConfig) -> None:
        self.config = config
        self.children = Children()
        self.spool = SpoolBudget(config.spool_limit)
        self._sessions: dict[int, int] = {}
        self._lock = threading.Lock()
        self._workdirs: set[Path] = set()
        self._last_refusal_log = 0.0
        self._unlogged_refusals = 0
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
        """Log a refusal that costs a caller little, at most about once a second.

        Over-limit connections, users in none of the stap groups and malformed
        requests can be made in a loop; the lines left out are counted in the
        next one, so nobody can flood the journal.
        """
        with self._lock:
            now = time.monotonic()
            if now - self._last_refusal_log < _REFUSAL_LOG_RATE:
                self._unlogged_refusals += 1
                return
            more = self._unlogged_refusals
            self._last_refusal_log, self._unlogged_refusals = now, 0
        LOG.info("%s%s", message, f" (and {more} more refusals not logged)" if more else "")

    def accept_one(self, listener: socket.socket) -> None:
        """Accept a connection and either start its session or refuse it at once.

        Runs in the accept loop: nothing here may block on the client.
        """
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and the like: the client is dropped, we go on
            LOG.warning("cannot accept a connection: %s", exc.strerror)
            time.sleep(0.05)
            return
        try:
            uid = peer_uid(conn)
        except OSError as exc:
            LOG.warning("cannot identify a caller: %s", exc.strerror)
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
            LOG.error("uid %d: cannot start a session: %s", uid, exc)

    def handle(self, conn: socket.socket, uid: int) -> None:
        """Serve one admitted connection to its end; never raises."""
        with conn:
            try:
                conn.setblocking(True)
                self._session(conn, uid)
            except Exception as exc:  # a broken session must not take the loader down
                LOG.error("uid %d: session failed: %r", uid, exc)
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
            workdir = private_workdir("stap-loader-")  # 0700, root's: nobody can swap the module
        except OSError as exc:
            LOG.error("%s: cannot make a private directory: %s", who, exc.strerror)
            _refuse(conn, f"stap-loader cannot store the module: {exc.strerror}")
            return
        holding = Holding(self.spool)
        with self._lock:
            self._workdirs.add(workdir)
        try:
            req = self._receive(conn, who, deadline, workdir, holding)
            if req is not None:
                self._load(conn, who, caller, req)
        finally:
            with self._lock:
                self._workdirs.discard(workdir)
            shutil.rmtree(workdir, ignore_errors=True)
            holding.release()

    def _receive(
        self,
        conn: socket.socket,
        who: str,
        deadline: float,
        workdir: Path,
        holding: Holding,
    ) -> SpooledRequest | None:
        """The request, or None after refusing it (or when the client sent nothing)."""
        try:
            return receive_request(conn, deadline, workdir, holding, MAX_MODULE_BYTES)
        except TimeoutError:
            limit = f"{self.config.io_timeout:g}"
            self._log_refusal(f"{who}: refused: request not complete within {limit} s")
            _refuse(conn, f"bad request: not complete within {limit} seconds")
        except wire.WireError as exc:
            self._log_refusal(f"{who}: bad request: {exc}")
            _refuse(conn, f"bad request: {exc}")
        except SpoolFull as exc:
            LOG.warning("%s: refused: %s", who, exc)
            _refuse(conn, str(exc))
        except OSError as exc:  # our side: the spool's file system is full, or the like
            LOG.error("%s: cannot store a module: %s", who, exc.strerror)
            _refuse(conn, f"stap-loader cannot store the module: {exc.strerror}")
        return None

    def _load(self, conn: socket.socket, who: str, caller: Caller, req: SpooledRequest) -> None:
        """Judge ``req``, and if allowed run it, streaming its output and then its status."""
        conn.settimeout(self.config.io_timeout)  # from now on: for each piece of output
        decision = judge(caller, req, self.signer_store())
        verdict = "loading" if decision.allowed else "refused"
        LOG.info("%s: %s: %s: %s", who, req.module_name, verdict, decision.reason)
        if not decision.allowed:
            _refuse(conn, decision.reason)
            return
        kind = kind_of_module(req.module_name)
        assert kind is not None  # the wire format admits .bo and .ko alone
        try:
            tool = tool_for_root(self.config.stapbpf if kind == "bpf" else self.config.staprun)
            proc = self.children.spawn(kind, tool, req.module_path, runner_env(caller, kind))
        except (ValueError, OSError, ChildrenClosed) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            LOG.error("cannot run %s: %s", req.module_name, why)
            _refuse(conn, f"stap-loader cannot run {req.module_name}: {why}")
            return
        try:
            # A client already gone is noticed by stream(), which then stops the module.
            with contextlib.suppress(OSError):
                conn.sendall(wire.started(decision.reason))
            status = stream(proc, conn, self.config.stop_timeout)
        finally:
            self.children.discard(proc)
        LOG.info("%s: %s: exited with status %d", who, req.module_name, status)
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

    def close(self) -> None:
        """After :meth:`serve`: stop every module and remove what sessions still hold.

        Session threads do not outlive the process, so their private
        directories (a module half received, or one still running) go here.
        """
        self.children.stop_all(self.config.stop_timeout)
        with self._lock:
            workdirs = list(self._workdirs)
            self._workdirs.clear()
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)
