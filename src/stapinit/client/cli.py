"""``stap-client``: compile a script on a trusted stap-server, then save or run it.

With ``-p4`` the module (and its ``.sgn``) is saved in the current directory and
its name printed (spec §6.1.3); anyone may do that.  Otherwise it is run: by root
directly, by anyone else through ``stap-loader``, which decides who may load what
(spec §6.1.2).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Final

from stapinit.client.config import ClientConfig, read_client_config
from stapinit.client.load import root_runner, run_directly, run_via_loader
from stapinit.client.options import USAGE, ClientOptions, ClientUsageError, parse_args
from stapinit.core.errors import StapinitError
from stapinit.core.fsutil import atomic_write
from stapinit.core.lsb import EXIT_FAILED
from stapinit.core.runtime import kind_of_module
from stapinit.protocol import (
    DEFAULT_PORT,
    CompileRequest,
    CompileResponse,
    ProtocolError,
    Tapset,
    check_module_name,
    read_tapsets,
)
from stapinit.trust.address import ServerAddress
from stapinit.trust.connection import ServerError, compile_on
from stapinit.trust.signing import SIGNATURE_SUFFIX
from stapinit.trust.stores import StorePaths, trusted_server_fingerprints

PROG: Final = "stap-client"
#: Where a server is looked for when none is named (spec §6.2.1: "a client on
#: ... the same host"): upstream finds servers with Avahi; without it, the local one.
LOCAL_SERVER: Final = ServerAddress("localhost", DEFAULT_PORT)


class ClientError(StapinitError):
    """An expected failure; ``str()`` is the one line shown to the user."""


def _warn(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


# --- building the request ----------------------------------------------------------


def _tapsets(directories: Sequence[str]) -> tuple[Tapset, ...]:
    try:
        return read_tapsets(directories)
    except ProtocolError as error:
        raise ClientError(str(error)) from None


def build_request(opts: ClientOptions, config: ClientConfig) -> CompileRequest:
    """The compile request for what the user asked."""
    uname = os.uname()
    dashed = [arg for arg in opts.script_args if arg.startswith("-")]
    if dashed:
        # The server reads its options list as stap would: these would be options.
        raise ClientError(f"script argument {dashed[0]!r} starts with '-'; stap-server refuses it")
    if opts.script_text is not None:
        text, name, is_eval = opts.script_text, None, True
    else:
        assert opts.script_file is not None  # parse_args guarantees one or the other
        path = Path(opts.script_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ClientError(f"cannot read script {path}: {exc}") from None
        name, is_eval = path.name, False
    return CompileRequest(
        script_text=text,
        script_name=name,
        eval=is_eval,
        release=opts.release or uname.release,
        arch=uname.machine,
        tapsets=_tapsets(opts.include_dirs),
        options=("-v",) * opts.verbose + opts.script_args,
        module_name=opts.module_name,
        privilege=opts.privilege,
        runtime=opts.runtime or config.runtime or "kmod",
    )


# --- talking to servers ------------------------------------------------------------


def compile_on_servers(
    opts: ClientOptions, config: ClientConfig, req: CompileRequest
) -> CompileResponse:
    """Send ``req`` to the first trusted, reachable server; raise ClientError if none.

    The servers are those of ``--server``, else those of client.conf, else the
    local one (:data:`LOCAL_SERVER`), so that spec §6.2.1's example works on
    the host running the server once it is authorized.
    """
    servers = opts.servers or config.servers
    trusted = trusted_server_fingerprints(StorePaths.default(), os.getuid(), _warn)
    if not servers:
        try:
            return _compile_on(LOCAL_SERVER, trusted, req)
        except ServerError as exc:
            raise ClientError(
                f"{exc}; no other server is known: give --server=HOST[:PORT] "
                "or list servers in client.conf"
            ) from None
    last: ServerError | None = None
    for address in servers:
        try:
            return _compile_on(address, trusted, req)
        except ServerError as exc:  # untrusted ones included: nothing was sent to them
            last = exc
        if len(servers) > 1:
            _warn(str(last))
    assert last is not None
    raise ClientError(str(last) if len(servers) == 1 else "no usable server")


def _compile_on(
    address: ServerAddress, trusted: Collection[str], req: CompileRequest
) -> CompileResponse:
    return compile_on(address, trusted, req)


def shown_stdout(stdout: str) -> str:
    """stap's standard output as the client shows it: without the module's name.

    At pass 4 stap prints the name of the module it wrote as its last line.
    The client prints that name itself, once it has saved a module; when
    nothing was produced (a failed or refused compile) nothing is printed.
    """
    lines = stdout.splitlines(keepends=True)
    if lines and _is_module_file_name(lines[-1].strip()):
        lines.pop()
    return "".join(lines)


def _is_module_file_name(text: str) -> bool:
    if kind_of_module(text) is None:
        return False
    try:
        check_module_name(text.rpartition(".")[0])
    except ProtocolError:
        return False
    return True


def check_module_file(name: str, req: CompileRequest) -> str:
    """``name`` if it is the module file ``req`` asked for, else raise ClientError (pure).

    stap's rule: ``NAME.ko`` for the kmod runtime, ``NAME.bo`` for bpf, NAME
    a module name (:func:`~stapinit.protocol.check_module_name`) and the
    ``-m`` name when one was given.  Anything else (``Makefile``, ``.bashrc``)
    is what a hostile server would like written into the current directory.
    """
    stem = name.rpartition(".")[0]
    if (
        kind_of_module(name) != req.runtime
        or not _is_module_file_name(name)
        or (req.module_name is not None and stem != req.module_name)
    ):
        wanted = f"{req.module_name or 'NAME'}{'.bo' if req.runtime == 'bpf' else '.ko'}"
        raise ClientError(f"the server sent a module named {name!r}, not {wanted}")
    return name


def save_file(path: Path, data: bytes) -> None:
    """Write ``path`` through a temp file; refuse to replace what is not a regular file.

    A symlink at ``path`` is refused, not followed (nor replaced): the current
    directory may be another user's.  Raises ClientError.
    """
    try:
        mode: int | None = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise ClientError(f"cannot save {path}: {exc.strerror}") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise ClientError(f"refusing to replace {path}: it is not a regular file")
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise ClientError(f"cannot save {path}: {exc.strerror}") from None


def _print_messages(resp: CompileResponse) -> None:
    """Show stap's messages; the module name on stdout is printed by the caller, if at all."""
    sys.stderr.write(resp.stderr)
    sys.stdout.write(shown_stdout(resp.stdout))
    sys.stdout.flush()
    sys.stderr.flush()


# --- results -----------------------------------------------------------------------


def _exit_status(status: int) -> int:
    """stap's exit status as the server reported it, kept within what a process can exit with."""
    return status if 0 <= status <= 255 else EXIT_FAILED


def _run(argv: Sequence[str]) -> int:
    try:
        opts = parse_args(argv, DEFAULT_PORT)
    except ClientUsageError as exc:
        raise ClientUsageError(f"{exc} (see {PROG} --help)") from None
    if opts.help:
        print(USAGE, end="")
        return 0
    as_root = os.geteuid() == 0
    config = read_client_config(StorePaths.default(), DEFAULT_PORT, as_root, _warn)
    req = build_request(opts, config)
    compile_only = opts.compile_only
    if not compile_only and req.release != os.uname().release:
        _warn(f"kernel release {req.release} is not this host's: compiling only (-p4)")
        compile_only = True

    # Root runs the module itself: the tool is checked before a server does any work.
    tool = (
        None
        if compile_only or not as_root
        else root_runner(req.runtime, config.stapbpf, config.staprun)
    )
    resp = compile_on_servers(opts, config, req)
    _print_messages(resp)
    if resp.status != 0:
        return _exit_status(resp.status)
    module = resp.module
    if module is None:
        raise ClientError("the server reported success but sent no module")

    check_module_file(module.name, req)

    if compile_only:
        save_file(Path(module.name), module.data)
        if resp.signature is not None:
            save_file(Path(module.name + SIGNATURE_SUFFIX), resp.signature)
        print(module.name)
        return 0
    if tool is not None:
        return run_directly(req.runtime, tool, module.name, module.data, opts.output_file)
    return run_via_loader(
        config.loader_socket, module.name, module.data, resp.signature, opts.output_file
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stap-client``; returns the exit status."""
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except StapinitError as exc:
        _warn(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the one-line promise holds even for the unforeseen
        _warn(f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
