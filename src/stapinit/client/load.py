"""Loading a compiled module: directly for root, through ``stap-loader`` for others.

Either way the module's output is printed until it ends; Ctrl-C stops it
cleanly (its ``end`` probes run) and a second Ctrl-C gives up waiting.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import BinaryIO, Final

from stapinit import loader_wire as wire
from stapinit.core.errors import StapinitError
from stapinit.core.process import stop_child
from stapinit.core.runtime import RuntimeKind, foreground_command, kind_of_module
from stapinit.core.tools import private_workdir, tool_for_root

#: How long a stopped module may take to finish before it is killed / given up on.
STOP_TIMEOUT: Final = 10.0
#: Signals that stop a module root runs directly.
_STOPPING: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class LoadError(StapinitError):
    """The module could not be loaded; ``str()`` is one line."""


def root_runner(kind: RuntimeKind, stapbpf: str, staprun: str) -> str:
    """The tool root runs ``kind`` modules with, checked fit for root before anything is done.

    It must be root's alone (:func:`stapinit.core.tools.tool_for_root`);
    raises LoadError otherwise.
    """
    try:
        return tool_for_root(stapbpf if kind == "bpf" else staprun)
    except ValueError as exc:
        raise LoadError(str(exc)) from None


def run_directly(
    kind: RuntimeKind, tool: str, module_name: str, module: bytes, output_file: str | None
) -> int:
    """Run the module with ``tool`` (from :func:`root_runner`) as this (root) process.

    Returns its exit status. The module is written to a directory only root
    can change. Ctrl-C stops the module with :func:`stop_child` (SIGTERM, so
    its ``end`` probes run; SIGKILL after :data:`STOP_TIMEOUT`), and so do
    SIGTERM and SIGHUP; a second one kills it at once.
    """
    if kind_of_module(module_name) != kind:
        raise LoadError(f"the server sent {module_name}, not a module for the {kind} runtime")
    workdir = private_workdir("stap-client-")
    try:
        path = workdir / module_name
        path.write_bytes(module)
        output = None if output_file is None else os.path.abspath(output_file)
        try:
            # Its own session: Ctrl-C reaches us alone, and we stop its whole group.
            proc = subprocess.Popen(
                foreground_command(kind, tool, str(path), output),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise LoadError(f"cannot run {tool}: {exc.strerror}") from None
        # SIGTERM and SIGHUP (a closed terminal) stop it as Ctrl-C does: in its
        # own session, it would not get them otherwise. SIGINT too, explicitly:
        # started with it ignored (a background job, nohup), Python keeps it so.
        previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in _STOPPING}
        try:
            try:
                proc.wait()
            except KeyboardInterrupt:
                stop_child(proc, STOP_TIMEOUT)
        except KeyboardInterrupt:
            stop_child(proc, 0)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        returncode = proc.poll()
        return wire.exit_status(returncode if returncode is not None else -signal.SIGKILL)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_via_loader(
    socket_path: Path,
    module_name: str,
    module: bytes,
    signature: bytes | None,
    output_file: str | None,
) -> int:
    """Ask ``stap-loader`` to run the module; print what it prints; its exit status."""
    request = wire.LoadRequest(module_name, module, signature)
    if output_file is None:
        return _load(socket_path, request, sys.stdout.buffer)
    try:
        # Opened first, and as the user: the loader never writes files for its callers.
        out = open(output_file, "wb")  # noqa: SIM115
    except OSError as exc:
        raise LoadError(f"cannot write {output_file}: {exc.strerror}") from None
    with out:
        return _load(socket_path, request, out)


def _load(socket_path: Path, request: wire.LoadRequest, out: BinaryIO) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(socket_path))
        except OSError as exc:
            raise LoadError(
                f"cannot reach stap-loader at {socket_path}: {exc.strerror or exc}; "
                f"non-root users load modules through the stap-loader service"
            ) from None
        send_error: OSError | None = None
        try:
            for part in wire.load_request_parts(request):
                if part:  # an empty send after the loader has answered would fail
                    sock.sendall(part)
        except OSError as exc:
            # The loader may refuse before reading it all, and close: its answer
            # is queued here all the same, so read it before reporting the error.
            send_error = exc
        first: wire.Frame | None = None
        read_error: OSError | wire.WireError | None = None
        try:
            first = wire.read_frame(sock, wire.MAX_OUTPUT_CHUNK)
        except (OSError, wire.WireError) as exc:
            read_error = exc
        if first is not None and first.type == "refused":
            raise LoadError(str(first.header.get("reason", "refused")))
        cause = send_error or read_error
        if cause is not None:
            why = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
            raise LoadError(f"lost the connection to stap-loader: {why}")
        if first is None:
            raise LoadError("stap-loader closed the connection without an answer")
        if first.type != "started":
            raise LoadError(f"stap-loader sent an unexpected {first.type!r} message")
        return _stream(sock, out)


def _stream(sock: socket.socket, out: BinaryIO) -> int:
    """Copy the module's output until its exit status arrives.

    The first Ctrl-C half-closes the connection, which tells the loader to stop
    the module; its remaining output and status still arrive.  A handler rather
    than KeyboardInterrupt, so that a frame is never abandoned half-read.
    """
    interrupts = 0

    def on_sigint(_signum: int, _frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            raise KeyboardInterrupt
        sock.settimeout(STOP_TIMEOUT + 5)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        while True:
            try:
                frame = wire.read_frame(sock, wire.MAX_OUTPUT_CHUNK)
            except TimeoutError:
                raise LoadError("stap-loader did not stop the module in time") from None
            except (OSError, wire.WireError) as exc:
                raise LoadError(f"lost the connection to stap-loader: {exc}") from None
            if frame is None:
                raise LoadError("stap-loader closed the connection before the module ended")
            if frame.type == "output":
                target = sys.stderr.buffer if frame.header.get("stream") == "stderr" else out
                target.write(frame.payload)
                target.flush()
            elif frame.type == "exit":
                status = frame.header.get("status")
                return status if isinstance(status, int) and 0 <= status <= 255 else 1
    finally:
        signal.signal(signal.SIGINT, previous)
