"""Compiling through trusted stap-servers: ``COMPILE_SERVER`` (spec §5.8, §6.2.1).

A production host without stap, a compiler or kernel headers gets its caches
from a stap-server whose certificate is in the client trust store
(``/etc/systemtap/ssl/client/``, and the user's own ``~/.systemtap/ssl/client/``
for a user's compile), for this host's release and architecture (or ``-r``).
The cache is the one a local compile makes (``NAME.ko``/``NAME.bo`` and
``NAME.opts``) plus the server's signature ``NAME.ko.sgn``/``NAME.bo.sgn``.

Servers are tried in the order given. One that is down, untrusted, or refuses
the request is passed over (nothing is sent to an untrusted one); when none
answers, the script's compile fails with one line naming why. A script that
does not compile fails on the first server that answers: another would say
the same.

Only this module's callers import it, and only when ``COMPILE_SERVER`` is set:
TLS and crypto code are loaded on first use here, never on the boot path of a
host that compiles locally.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, NamedTuple

from stapinit.initscript import cache
from stapinit.initscript.cache import KernelIdentity
from stapinit.initscript.compiler import CompileResult, failure_line, read_script, wanted_record
from stapinit.initscript.options import OptionError, Phase, parse_options
from stapinit.initscript.scripts import Script

if TYPE_CHECKING:  # the protocol is loaded only to compile: verify.py needs none of it
    from stapinit.protocol import CompileRequest, CompileResponse, Privilege, Tapset
    from stapinit.trust.address import ServerAddress

#: Compiles sent at once: the servers queue and limit their own work.
MAX_PARALLEL: Final = 4
#: Bounds on what ``-I`` directories may hold: they go to the server in the request.
MAX_TAPSET_FILES: Final = 256
MAX_TAPSET_BYTES: Final = 16 * 1024 * 1024

Warn = Callable[[str], None]


class RemoteError(Exception):
    """A script cannot be compiled through a server; ``str()`` is one line."""


class ServerOptions(NamedTuple):
    """A script's compile options as a compile request carries them.

    ``options`` are the options given to the compile (phases COMPILE and
    REPORT of :mod:`stapinit.initscript.options`) without those the request
    has fields for: ``--privilege``/``--unprivileged`` become ``privilege``
    and ``-I DIR`` the tapsets read from ``include_dirs``.  ``signed`` are
    those of phase COMPILE alone, the ones the cache record holds: the server
    signs them (it leaves report-only options such as ``-w`` out,
    :data:`stapinit.server.policy.REPORT_ONLY`), ``privilege`` and the runtime.
    """

    options: tuple[str, ...]
    privilege: Privilege
    include_dirs: tuple[str, ...]
    signed: tuple[str, ...]


def server_options(script: Script) -> ServerOptions:
    """Split ``script``'s compile options for a request (pure); raises RemoteError.

    ``--privilege=stapsys`` has no equivalent in the protocol and is refused.
    """
    try:
        parsed = parse_options(script.compile_options)
    except OptionError as error:  # compile_options re-splits what parsed before
        raise RemoteError(f"{script.name}_OPT: {error}") from None
    kept: list[str] = []
    signed: list[str] = []
    include: list[str] = []
    privilege: Privilege = "stapdev"
    for option in parsed:
        if option.flag == "--unprivileged":
            privilege = "stapusr"
        elif option.flag == "--privilege":
            if option.value not in ("stapdev", "stapusr"):
                raise RemoteError(
                    f"--privilege={option.value} cannot be compiled through a compile server "
                    "(only stapdev and stapusr)"
                )
            privilege = "stapdev" if option.value == "stapdev" else "stapusr"
        elif option.flag == "I" and option.value is not None:
            include.append(option.value)
        else:
            kept.extend(option.words)
            if option.row.phase is Phase.COMPILE:
                signed.extend(option.words)
    return ServerOptions(tuple(kept), privilege, tuple(include), tuple(signed))


def build_request(
    script: Script, text: str, tapsets: tuple[Tapset, ...], kernel: KernelIdentity
) -> CompileRequest:
    """The compile request for ``script`` whose source is ``text`` (pure)."""
    from stapinit.protocol import CompileRequest

    assert script.source is not None
    split = server_options(script)
    return CompileRequest(
        script_text=text,
        script_name=script.source.name,
        release=kernel.release,
        arch=kernel.machine,
        tapsets=tapsets,
        options=split.options,
        module_name=script.name,
        privilege=split.privilege,
        runtime="bpf" if script.runtime == "bpf" else "kmod",
    )


def read_tapsets(directories: Sequence[str]) -> tuple[Tapset, ...]:
    """Every ``*.stp`` file under the ``-I`` directories, by path relative to its directory.

    Raises RemoteError for an unreadable directory or file, a file in two
    directories with different text, or more than the bounds allow.
    """
    from stapinit.protocol import Tapset

    found: dict[str, Tapset] = {}
    total = 0
    for name in directories:
        directory = Path(name)
        if not directory.is_dir():
            raise RemoteError(f"-I {directory}: not a directory")
        for file in sorted(directory.rglob("*.stp")):
            rel = file.relative_to(directory).as_posix()
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise RemoteError(f"cannot read tapset {file}: {error}") from None
            if rel in found and found[rel].text != text:
                raise RemoteError(f"tapset {rel} is in more than one -I directory")
            total += len(text)
            found[rel] = Tapset(rel, text)
            if len(found) > MAX_TAPSET_FILES or total > MAX_TAPSET_BYTES:
                raise RemoteError(
                    f"the -I directories hold more than {MAX_TAPSET_FILES} tapset files "
                    f"or {MAX_TAPSET_BYTES} bytes"
                )
    return tuple(found.values())


def check_response(script: Script, response: CompileResponse) -> tuple[bytes, bytes]:
    """The module and signature of a successful answer (pure); raises RemoteError."""
    if response.status != 0:
        raise RemoteError(failure_line(response.stderr, response.status))
    module = response.module
    expected = f"{script.name}{script.module_suffix}"
    if module is None:
        raise RemoteError("the server reported success but sent no module")
    if module.name != expected:
        raise RemoteError(f"the server sent {module.name}, not {expected}")
    if response.signature is None:
        raise RemoteError(f"the server sent {expected} unsigned")
    return module.data, response.signature


def ask_servers(
    servers: Sequence[ServerAddress], trusted: set[str], req: CompileRequest, timeout: float
) -> tuple[ServerAddress, CompileResponse]:
    """The first answer of a trusted server, in order; raises RemoteError naming why none did.

    ``trusted`` are the fingerprints of the trusted servers' certificates;
    ``timeout`` bounds each wait for a server's answer (seconds).
    """
    from stapinit.trust.connection import ServerError, compile_remote, connect_pinned

    errors: list[str] = []
    for address in servers:
        try:
            conn = connect_pinned(address, trusted, timeout)
            return address, compile_remote(conn, address, req)
        except ServerError as error:
            errors.append(" ".join(str(error).split()))
    raise RemoteError("; ".join(errors))


def compile_one(
    servers: Sequence[ServerAddress],
    trusted: set[str],
    script: Script,
    kernel: KernelIdentity,
    cache_dir: Path,
    temp_path: Path,
    timeout: float,
) -> CompileResult:
    """Compile one script through ``servers`` and install it into ``cache_dir``."""
    if script.source is None:
        return CompileResult(script.name, False, "cache-only script: there is no .stp to compile")
    try:
        # The bytes a local compile reads (no newline translation): the signed
        # source digest must equal the one the host computes from its file.
        text = read_script(script.source).data.decode("utf-8")
        req = build_request(script, text, read_tapsets(server_options(script).include_dirs), kernel)
    except (OSError, UnicodeDecodeError) as error:
        return CompileResult(script.name, False, f"cannot read {script.source}: {error}")
    except RemoteError as error:
        return CompileResult(script.name, False, str(error))
    try:
        address, response = ask_servers(servers, trusted, req, timeout)
    except RemoteError as error:
        return CompileResult(script.name, False, str(error))
    output = f"compiled by stap-server {address}\n{response.stdout}{response.stderr}"
    try:
        module, signature = check_response(script, response)
    except RemoteError as error:
        return CompileResult(script.name, False, f"server {address}: {error}", (), output)
    try:
        _install(script, kernel, cache_dir, temp_path, module, signature)
    except OSError as error:
        summary = f"cannot write cache {cache_dir}: {error.strerror}"
        return CompileResult(script.name, False, summary, (), output)
    return CompileResult(script.name, True, f"compiled by {address}", (), output)


def _install(
    script: Script,
    kernel: KernelIdentity,
    cache_dir: Path,
    temp_path: Path,
    module: bytes,
    signature: bytes,
) -> None:
    """Install a module as a local compile would, with its signature."""
    import shutil
    import tempfile

    from stapinit.core.fsutil import atomic_write

    workdir = Path(tempfile.mkdtemp(prefix=f"stap-{script.name}-", dir=temp_path))
    try:
        built = workdir / f"{script.name}{script.module_suffix}"
        atomic_write(built, module, durable=False)
        record = wanted_record(script, kernel)
        cache.install(cache_dir, script.name, script.module_suffix, built, record, signature)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def compile_many(
    servers: Sequence[ServerAddress],
    scripts: Sequence[Script],
    kernel: KernelIdentity,
    cache_dir: Path,
    temp_path: Path,
    timeout: float,
    warn: Warn,
) -> list[CompileResult]:
    """Compile ``scripts`` through ``servers``, a few at once; results in input order.

    ``timeout`` (``COMPILE_TIMEOUT``) bounds each wait for a server's answer.

    The trusted servers are those of the system-wide client store and of the
    calling user's own (spec §6.2.1); ``warn`` hears about stores that are
    ignored as unsafe.
    """
    if not scripts:
        return []
    from concurrent.futures import ThreadPoolExecutor

    from stapinit.trust.stores import StorePaths, trusted_server_fingerprints

    trusted = trusted_server_fingerprints(StorePaths.default(), os.getuid(), warn)
    with ThreadPoolExecutor(max_workers=min(len(scripts), MAX_PARALLEL)) as pool:
        return list(
            pool.map(
                lambda s: compile_one(servers, trusted, s, kernel, cache_dir, temp_path, timeout),
                scripts,
            )
        )
