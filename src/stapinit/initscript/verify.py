"""Verifying signed caches before loading them: ``REQUIRE_SIGNED=yes`` (spec §6.1.2).

With ``REQUIRE_SIGNED=yes`` a cache is valid only if its ``NAME.ko.sgn`` /
``NAME.bo.sgn`` verifies against the trusted signers (``/etc/systemtap/staprun/``,
under ``$STAP_TRUST_ROOT`` if set, spec §6.1.2) and its signed manifest
matches this host and the script as configured now: the module's digest and
file name, the kernel release and architecture, the runtime, the privilege
level, the compile options the cache record holds (phase COMPILE; less
the privilege and ``-I``, which a request carries in fields of their own:
``signed`` of :func:`stapinit.initscript.remote.server_options`). Options
that change only what stap prints (``-v``, ``-w``) are in neither, so
changing them leaves a signed cache valid. And what was compiled: the
manifest's ``source`` must be :func:`stapinit.protocol.source_digest` of
this host's own ``SCRIPT_PATH/NAME.stp`` and of the tapsets in the script's
own ``-I`` directories on this host (the SHA-256 of the script alone when it
has none), so a module compiled with tapsets this host does not have, or
other ones, is refused: a tapset can redefine what the script calls and add
probes of its own. A signature proves only which server compiled a
module, and a server compiles whatever any client sends, under any module
name; the script the admin placed on this host is what says the module is
theirs. So a cache-only script (no ``.stp``) is refused. The ``.opts`` record
alone cannot vouch for a cache: anyone able to write it could also swap the
module; a signature cannot be made without the server's key.

Offline: nothing but local files is read. Only imported when the setting is
on, as it loads the ``cryptography`` package.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, NamedTuple

from cryptography import x509

from stapinit.initscript import cache
from stapinit.initscript.cache import KernelIdentity
from stapinit.initscript.compiler import read_script
from stapinit.initscript.remote import RemoteError, server_options
from stapinit.initscript.scripts import Script
from stapinit.protocol import MAX_MODULE_BYTES, read_tapsets, source_digest
from stapinit.trust.signing import SignatureError, verify_module
from stapinit.trust.stores import StorePaths, signer_store

#: Largest ``.sgn`` file read: a manifest with a long option list fits many times.
MAX_SIGNATURE_BYTES: Final = 256 * 1024

Warn = Callable[[str], None]


class Expected(NamedTuple):
    """What a cache's signed manifest must say to be loaded on this host."""

    module_name: str  # NAME.ko or NAME.bo
    source: str  # source_digest of the host's NAME.stp and its -I tapsets
    release: str
    arch: str
    runtime: str
    privilege: str
    options: tuple[str, ...]


def expected_manifest(script: Script, kernel: KernelIdentity, source: str) -> Expected:
    """What ``script``'s cache for ``kernel`` must have been signed for (pure).

    ``source`` is what the host's own script and tapsets give
    (:func:`host_source`). Raises RemoteError
    when the script's options cannot go to a compile server, so no server
    can have signed them.
    """
    split = server_options(script)
    return Expected(
        module_name=f"{script.name}{script.module_suffix}",
        source=source,
        release=kernel.release,
        arch=kernel.machine,
        runtime=script.runtime,
        privilege=split.privilege,
        options=split.signed,
    )


def check(
    sgn: bytes,
    module: bytes,
    trusted: Sequence[x509.Certificate],
    expected: Expected,
    now: dt.datetime | None = None,
) -> str | None:
    """Why a signed cache may not be loaded (one line), or None when it may (pure).

    The signature must verify against one of ``trusted`` at ``now`` (default:
    the current time) and match ``module`` (:func:`verify_module`); its
    manifest must then name exactly what ``expected`` says.
    """
    try:
        manifest = verify_module(sgn, module, trusted, now)
    except SignatureError as error:
        return f"signature refused: {error}"
    signed = Expected(
        manifest.module_name,
        manifest.source,
        manifest.release,
        manifest.arch,
        manifest.runtime,
        manifest.privilege,
        manifest.options,
    )
    for field, have, want in zip(Expected._fields, signed, expected, strict=True):
        if have != want and field == "source":
            script = expected.module_name.rpartition(".")[0] + ".stp"
            return (
                f"signed for another script text or tapsets (sha256 {_short(have)}) "
                f"than this host's {script} and its -I directories (sha256 {_short(want)})"
            )
        if have != want:
            return f"signed for {field.replace('_', ' ')} {_show(have)}, not {_show(want)}"
    return None


def _short(digest: object) -> str:
    return f"{str(digest)[:16]}..."


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + " ".join(map(str, value)) + "]" if value else "no options"
    return repr(value)


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, not following a symlink.

    Raises OSError (a symlink is ELOOP) or ValueError (not a regular file, too big).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{path} is larger than {limit} bytes")
        chunks = []
        size = 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ValueError(f"{path} is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def host_source(script: Script, text: Path) -> str:
    """The ``source`` a module of ``script`` must be signed for on this host.

    :func:`stapinit.protocol.source_digest` of the file ``text`` (read by
    :func:`read_script`) and of the ``*.stp`` files in the ``-I``
    directories of ``script``'s options, read on this host as a compile
    through a server sends them (:func:`stapinit.protocol.read_tapsets`).
    Raises OSError (the script), ProtocolError (the tapsets) or RemoteError
    (options no server compiles).
    """
    tapsets = read_tapsets(server_options(script).include_dirs)
    return source_digest(read_script(text).data, tapsets)


def no_script(name: str) -> str:
    """Why a module of a script without a ``.stp`` on this host is refused (one line)."""
    return f"REQUIRE_SIGNED=yes: {name} has no script in SCRIPT_PATH to check its signature against"


@functools.cache
def trusted_signers(paths: StorePaths, warn: Warn) -> tuple[x509.Certificate, ...]:
    """The certificates of the signer store, read once per process."""
    return tuple(entry.certificate for entry in signer_store(paths).certificates(warn))


def signature_problem(
    script: Script,
    kernel: KernelIdentity,
    directory: Path,
    warn: Warn,
    paths: StorePaths | None = None,
) -> str | None:
    """Why ``script``'s cache in ``directory`` may not be loaded, or None when it may.

    Reads the script's ``.stp`` and ``-I`` tapsets (:func:`host_source`), the module and its
    ``.sgn`` (regular files, no symlinks, bounded) and the signer store of
    ``paths`` (default: :meth:`StorePaths.default`). A cache-only script has
    no text to check the signature against and is refused.
    """
    if script.source is None:
        return no_script(script.name)
    suffix = script.module_suffix
    sgn_path = cache.signature_path(directory, script.name, suffix)
    module_path = cache.module_path(directory, script.name, suffix)
    try:
        expected = expected_manifest(script, kernel, host_source(script, script.source))
        if not os.path.lexists(sgn_path):
            return f"not signed (no {sgn_path.name})"
        sgn = read_bounded(sgn_path, MAX_SIGNATURE_BYTES)
        module = read_bounded(module_path, MAX_MODULE_BYTES)
    except OSError as error:
        return f"cannot read {error.filename}: {error.strerror}"
    except (ValueError, RemoteError) as error:
        return str(error)
    store = paths or StorePaths.default()
    signers = trusted_signers(store, warn)
    if not signers:
        return f"REQUIRE_SIGNED=yes, but there is no trusted signer in {store.signers}"
    return check(sgn, module, signers, expected)
