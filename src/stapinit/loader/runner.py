"""Running a module for a caller: its command line, its environment, its output, its end.

The runner (``stapbpf`` or ``staprun``, stap(1)'s foreground contract from
:mod:`stapinit.core.runtime`) runs in its own session with exactly the
environment given here; its output is forwarded to the client as it comes;
stopping it is :func:`stapinit.core.process.stop_child` (SIGTERM so that its
``end`` probes run, SIGKILL after the grace period).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Final

from stapinit import loader_wire as wire
from stapinit.core.errors import StapinitError
from stapinit.core.process import stop_child
from stapinit.core.runtime import RuntimeKind, foreground_command
from stapinit.core.system import SYSTEM_PATH
from stapinit.loader.policy import Caller, Level, caller_level

#: Environment of the tools we run: nothing inherited from whoever started us.
CHILD_ENV: Final = {"PATH": SYSTEM_PATH}


def runner_env(caller: Caller, runtime: RuntimeKind) -> dict[str, str]:
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


class ChildrenClosed(StapinitError):
    """No module may start: the loader is stopping."""


class Children:
    """The modules running now, so that a stopping loader can stop them too."""

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._closed = False

    def spawn(
        self, kind: RuntimeKind, tool: str, module: Path, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start ``tool`` on ``module`` in the foreground, in its own session, with ``env``.

        Raises OSError when it cannot be started, and :class:`ChildrenClosed`
        once :meth:`stop_all` has begun.
        """
        with self._lock:
            if self._closed:
                raise ChildrenClosed("stap-loader is stopping")
            proc = subprocess.Popen(
                foreground_command(kind, tool, str(module), None),
                cwd=module.parent,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            self._procs.add(proc)
            return proc

    def discard(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop tracking ``proc`` (it has been reaped)."""
        with self._lock:
            self._procs.discard(proc)

    def stop_all(self, grace: float) -> None:
        """Stop every child at once (each: SIGTERM, SIGKILL after ``grace``); start no more."""
        with self._lock:
            self._closed = True
            procs = list(self._procs)
        stoppers = [threading.Thread(target=stop_child, args=(p, grace)) for p in procs]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()


def stream(proc: subprocess.Popen[bytes], conn: socket.socket, grace: float) -> int:
    """Forward ``proc``'s output to ``conn`` until it ends; stop it when the client stops.

    The client stops the module by shutting down its side (EOF) or by vanishing
    (a failed send): the child is then stopped by :func:`stop_child` in the
    background while its last output (its ``end`` probes') is still forwarded.
    Returns the shell-style exit status. Bounded: once the child is reaped,
    pipes that something outside its group holds open are waited for 1 s.
    """
    assert proc.stdout is not None and proc.stderr is not None
    client_alive = True
    stopper: threading.Thread | None = None
    reaped_at: float | None = None

    def stop() -> None:
        nonlocal stopper
        if stopper is None:
            stopper = threading.Thread(target=stop_child, args=(proc, grace), daemon=True)
            stopper.start()

    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
            sel.register(conn, selectors.EVENT_READ, "client")
            pipes = 2
            while pipes:
                for key, _ in sel.select(None if stopper is None else 0.1):
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
                if stopper is not None and not stopper.is_alive():
                    reaped_at = reaped_at or time.monotonic()
                    if time.monotonic() - reaped_at > 1.0:
                        break  # something outside its group holds the pipes: stop waiting
        if stopper is not None:
            stopper.join()
        else:
            try:
                proc.wait(grace)  # it closed its output: it is ending by itself
            except subprocess.TimeoutExpired:
                stop_child(proc, grace)
    finally:
        if proc.poll() is None:
            stop_child(proc, 0)
        proc.stdout.close()
        proc.stderr.close()
    returncode = proc.poll()
    return wire.exit_status(returncode if returncode is not None else -signal.SIGKILL)
