"""Wire format between ``stap-client`` and ``stap-server``: dataclasses and JSON.

The server speaks HTTPS.  ``GET /`` answers a :class:`ServerInfo`; ``POST /compile``
takes a :class:`CompileRequest` and answers a :class:`CompileResponse` (``200``) or an
error body ``{"error": "one line"}`` (``400`` policy refusal, ``413`` too large,
``503`` busy).  Everything here is pure: no sockets, no files.

Names that the server turns into paths (the script name, tapset paths, the module
name) are checked here, so both ends agree on what is acceptable and nothing unsafe
leaves a well-behaved client.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal, cast

from stapinit.core.runtime import RUNTIME_KINDS, RuntimeKind

SERVER_NAME: Final = "stap-server"
INFO_PATH: Final = "/"
COMPILE_PATH: Final = "/compile"
CONTENT_TYPE: Final = "application/json"
#: The TCP port stap-server listens on and stap-client connects to by default.
DEFAULT_PORT: Final = 9740

Privilege = Literal["stapdev", "stapusr"]
PRIVILEGES: Final[tuple[Privilege, ...]] = ("stapdev", "stapusr")

#: A module name (the file name without its suffix): stap's own rule for ``-m``
#: (longer names are silently truncated by stap, so refuse), which also covers the
#: names stap makes up itself (``stap_<hash>_<pid>``).
MODULE_NAME_RE: Final = re.compile(r"[a-z0-9_]{1,55}")
#: Largest module the server returns and the loader accepts.
MAX_MODULE_BYTES: Final = 64 * 1024 * 1024
#: Most of stap's standard output (and of its standard error) a client accepts in a
#: compile response: the 1 MiB of each that a server keeps
#: (:data:`stapinit.server.compiler.MAX_OUTPUT`, bytes, so at most as many characters)
#: and room for a line the server adds.
MAX_STREAM_CHARS: Final = 1024 * 1024 + 64 * 1024
MAX_NAME_BYTES: Final = 255
MAX_TAPSET_DEPTH: Final = 16
MAX_TAPSETS: Final = 256
#: Largest total text of the tapsets one request carries.
MAX_TAPSET_BYTES: Final = 16 * 1024 * 1024
#: Deepest nesting of JSON arrays and objects a message may have (requests have 3).
MAX_JSON_DEPTH: Final = 8
#: Longest JSON integer accepted (an exit status or a size needs far fewer digits).
MAX_INT_DIGITS: Final = 20


class ProtocolError(ValueError):
    """A message does not follow the wire format; ``str()`` is one line."""


@dataclass(frozen=True)
class ServerInfo:
    """What ``GET /`` answers."""

    version: str
    stap_version: str
    arch: str
    releases: tuple[str, ...]
    fingerprint: str
    server: str = SERVER_NAME


@dataclass(frozen=True)
class Tapset:
    """One file of a ``-I`` tapset directory, ``path`` relative to that directory."""

    path: str
    text: str


def read_tapsets(directories: Sequence[str | Path]) -> tuple[Tapset, ...]:
    """Every ``*.stp`` file under the ``-I`` directories, by path relative to its directory.

    What a client sends for stap's ``-I`` (the client and the boot-time
    service's ``COMPILE_SERVER``). Raises :class:`ProtocolError` for a
    directory or file that cannot be read, a file in two directories with
    different text, or more than :data:`MAX_TAPSETS` files or
    :data:`MAX_TAPSET_BYTES` bytes.
    """
    found: dict[str, Tapset] = {}
    total = 0
    for name in directories:
        directory = Path(name)
        if not directory.is_dir():
            raise ProtocolError(f"-I {directory}: not a directory")
        for file in sorted(directory.rglob("*.stp")):
            rel = file.relative_to(directory).as_posix()
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise ProtocolError(f"cannot read tapset {file}: {error}") from None
            if rel in found and found[rel].text != text:
                raise ProtocolError(f"tapset {rel} is in more than one -I directory")
            total += len(text)
            found[rel] = Tapset(rel, text)
            if len(found) > MAX_TAPSETS or total > MAX_TAPSET_BYTES:
                raise ProtocolError(
                    f"the -I directories hold more than {MAX_TAPSETS} tapset files "
                    f"or {MAX_TAPSET_BYTES} bytes"
                )
    return tuple(found.values())


def source_digest(script: bytes, tapsets: Sequence[Tapset]) -> str:
    """The hex SHA-256 that a module signature's ``source`` holds (pure).

    What a module was compiled from: ``script`` (the script's bytes, as
    compiled) and the ``-I`` ``tapsets`` sent with it. Without tapsets it is
    ``sha256(script)``, the ``source`` of a cache record (``NAME.opts``).
    With tapsets it is the SHA-256 of a canonical encoding: a tag whose
    first byte (``0xff``) UTF-8 never holds, so it is no script text a
    request can carry; the script's hex digest; then for each tapset,
    sorted by path, the 8-byte big-endian length of its UTF-8 path, that
    path and the 32-byte SHA-256 of its UTF-8 text. Every field is of fixed
    size or length-prefixed, so no two different (script, tapsets) give the
    same input to the hash, and the order the tapsets are listed in does
    not matter. The server signs it (:mod:`stapinit.server.app`); a host with
    ``REQUIRE_SIGNED=yes`` recomputes it from its own script and ``-I``
    directories (:mod:`stapinit.initscript.verify`).
    """
    # Imported here: OpenSSL's hashes cost milliseconds that many users of
    # this module (stop) never need.
    import hashlib

    plain = hashlib.sha256(script).hexdigest()
    if not tapsets:
        return plain
    digest = hashlib.sha256(b"\xffstap-source-with-tapsets/1\0" + plain.encode("ascii"))
    for tapset in sorted(tapsets, key=lambda t: t.path):
        path = tapset.path.encode("utf-8")
        digest.update(len(path).to_bytes(8, "big") + path)
        digest.update(hashlib.sha256(tapset.text.encode("utf-8")).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class CompileRequest:
    """A compile request.

    ``script_name`` is the base name of the script file, ``None`` for ``-e`` text
    (then ``eval`` is true).  ``options`` are the remaining stap options; the ones
    with dedicated fields (``-e -I -r -p -m --privilege --unprivileged``) are not
    repeated there.  ``runtime`` is the runtime field; ``--runtime=bpf`` or ``--bpf``
    among the options select BPF as well, which only the server's option parser
    (:func:`stapinit.server.policy.parse_compile_options`) decides.
    """

    script_text: str
    release: str
    arch: str
    script_name: str | None = None
    eval: bool = False
    tapsets: tuple[Tapset, ...] = ()
    options: tuple[str, ...] = ()
    module_name: str | None = None
    privilege: Privilege = "stapdev"
    runtime: RuntimeKind = "kmod"


@dataclass(frozen=True)
class Module:
    """A compiled module: file name (``NAME.ko`` or ``NAME.bo``) and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class CompileResponse:
    """The answer to a compile request that the server accepted and ran."""

    status: int
    stdout: str
    stderr: str
    module: Module | None = None
    signature: bytes | None = None
    cached: bool = False


# --- name checks -------------------------------------------------------------------


def check_file_name(name: str, what: str) -> str:
    """Return ``name`` if it is a safe single path component, else raise ProtocolError.

    Refused: empty, ``.``/``..``, slashes, NUL, a leading ``-`` (it would read as an
    option) or ``.`` (hidden files), and names longer than 255 bytes.
    """
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\0" in name
        or name.startswith(("-", "."))
        or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
        or not name.isprintable()
    ):
        raise ProtocolError(f"unsafe {what} {name!r}")
    return name


def check_tapset_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise ProtocolError."""
    parts = path.split("/")
    if len(parts) > MAX_TAPSET_DEPTH:
        raise ProtocolError(f"tapset path too deep: {path!r}")
    for part in parts:
        try:
            check_file_name(part, "tapset path component")
        except ProtocolError:
            raise ProtocolError(f"unsafe tapset path {path!r}") from None
    return path


def check_module_name(name: str) -> str:
    """Return ``name`` if stap accepts it for ``-m`` unchanged, else raise ProtocolError."""
    if not MODULE_NAME_RE.fullmatch(name):
        raise ProtocolError(f"invalid module name {name!r} (1-55 characters of a-z, 0-9, _)")
    return name


def _check_release_or_arch(value: str, what: str) -> str:
    # Releases name directories under /lib/modules: a single safe component.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}", value):
        raise ProtocolError(f"invalid {what} {value!r}")
    return value


# --- JSON helpers ------------------------------------------------------------------


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


def _check_tree(obj: Any, what: str) -> None:
    """Refuse nesting deeper than :data:`MAX_JSON_DEPTH` and strings that are not Unicode.

    JSON's ``\\ud800`` escapes give lone surrogates, which no file, command
    line or log line can carry.  Iterative: no recursion limit to hit.
    """
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = [*value.keys(), *value.values()]
        elif isinstance(value, list):
            children = value
        else:
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ProtocolError(f"{what}: a string is not valid Unicode") from None
            continue
        if depth > MAX_JSON_DEPTH:
            raise ProtocolError(f"{what}: nested deeper than {MAX_JSON_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def _load(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object from untrusted bytes; every failure is a one-line :class:`ProtocolError`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8 text") from None
    try:
        obj = json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"{what} is not JSON: {exc}") from None
    except ValueError as exc:  # from the hooks above
        raise ProtocolError(f"{what} is not acceptable JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"{what}: nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    _check_tree(obj, what)
    return cast(dict[str, Any], obj)


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in obj:
        raise ProtocolError(f"{what}: missing field {key!r}")
    value = obj[key]
    # bool is an int subclass; an int field must not accept true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{what}: field {key!r} has the wrong type")
    return value


def _str_list(obj: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = _get(obj, key, list, what)
    if not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{what}: field {key!r} must be a list of strings")
    return tuple(value)


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ProtocolError(f"{what} is not valid base64") from None


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- GET / -------------------------------------------------------------------------


def encode_server_info(info: ServerInfo) -> bytes:
    """Serialise the ``GET /`` answer."""
    return _dump(
        {
            "server": info.server,
            "version": info.version,
            "stap_version": info.stap_version,
            "arch": info.arch,
            "releases": list(info.releases),
            "fingerprint": info.fingerprint,
        }
    )


def decode_server_info(data: bytes) -> ServerInfo:
    """Parse the ``GET /`` answer; raises ProtocolError."""
    what = "server info"
    obj = _load(data, what)
    releases = _str_list(obj, "releases", what)
    for release in releases:
        _check_release_or_arch(release, "kernel release")
    return ServerInfo(
        server=_get(obj, "server", str, what),
        version=_get(obj, "version", str, what),
        stap_version=_get(obj, "stap_version", str, what),
        arch=_check_release_or_arch(_get(obj, "arch", str, what), "architecture"),
        releases=releases,
        fingerprint=_get(obj, "fingerprint", str, what),
    )


# --- POST /compile -----------------------------------------------------------------


def validate_compile_request(req: CompileRequest) -> CompileRequest:
    """Check field values (names, enumerations); return ``req`` or raise ProtocolError."""
    if req.eval and req.script_name is not None:
        raise ProtocolError("compile request: an -e script has no file name")
    if not req.eval and req.script_name is None:
        raise ProtocolError("compile request: a script file needs a name")
    if req.script_name is not None:
        check_file_name(req.script_name, "script name")
    if "\0" in req.script_text:
        raise ProtocolError("compile request: script contains a NUL character")
    if len(req.tapsets) > MAX_TAPSETS:
        raise ProtocolError(f"compile request: more than {MAX_TAPSETS} tapset files")
    seen: set[str] = set()
    for tapset in req.tapsets:
        check_tapset_path(tapset.path)
        if tapset.path in seen:
            raise ProtocolError(f"compile request: tapset {tapset.path!r} given twice")
        seen.add(tapset.path)
    directories = {str(parent) for p in seen for parent in PurePosixPath(p).parents}
    if clash := sorted(seen & directories):
        raise ProtocolError(f"compile request: tapset path {clash[0]!r} is also a directory")
    if any("\0" in opt for opt in req.options):
        raise ProtocolError("compile request: an option contains a NUL character")
    if req.module_name is not None:
        check_module_name(req.module_name)
    _check_release_or_arch(req.release, "kernel release")
    _check_release_or_arch(req.arch, "architecture")
    if req.privilege not in PRIVILEGES:
        raise ProtocolError(f"compile request: unknown privilege {req.privilege!r}")
    if req.runtime not in RUNTIME_KINDS:
        raise ProtocolError(f"compile request: unknown runtime {req.runtime!r}")
    return req


def encode_compile_request(req: CompileRequest) -> bytes:
    """Serialise a compile request (validated first; raises ProtocolError)."""
    validate_compile_request(req)
    return _dump(
        {
            "script": {"name": req.script_name, "text": req.script_text},
            "eval": req.eval,
            "tapsets": [{"path": t.path, "text": t.text} for t in req.tapsets],
            "options": list(req.options),
            "module_name": req.module_name,
            "release": req.release,
            "arch": req.arch,
            "privilege": req.privilege,
            "runtime": req.runtime,
        }
    )


def decode_compile_request(data: bytes) -> CompileRequest:
    """Parse and validate a compile request; raises ProtocolError with one line."""
    what = "compile request"
    obj = _load(data, what)
    script = _get(obj, "script", dict, what)
    tapsets = []
    for item in _get(obj, "tapsets", list, what):
        if not isinstance(item, dict):
            raise ProtocolError(f"{what}: each tapset must be an object")
        tapsets.append(Tapset(_get(item, "path", str, "tapset"), _get(item, "text", str, "tapset")))
    privilege = _get(obj, "privilege", str, what)
    runtime = _get(obj, "runtime", str, what)
    if privilege not in PRIVILEGES:
        raise ProtocolError(f"{what}: unknown privilege {privilege!r}")
    if runtime not in RUNTIME_KINDS:
        raise ProtocolError(f"{what}: unknown runtime {runtime!r}")
    req = CompileRequest(
        script_name=_get(script, "name", (str, type(None)), "script"),
        script_text=_get(script, "text", str, "script"),
        eval=_get(obj, "eval", bool, what),
        tapsets=tuple(tapsets),
        options=_str_list(obj, "options", what),
        module_name=_get(obj, "module_name", (str, type(None)), what),
        release=_get(obj, "release", str, what),
        arch=_get(obj, "arch", str, what),
        privilege=cast(Privilege, privilege),
        runtime=cast(RuntimeKind, runtime),
    )
    return validate_compile_request(req)


def encode_compile_response(resp: CompileResponse) -> bytes:
    """Serialise a compile response."""
    obj: dict[str, Any] = {
        "status": resp.status,
        "stdout": resp.stdout,
        "stderr": resp.stderr,
        "module": None
        if resp.module is None
        else {"name": resp.module.name, "data": _b64encode(resp.module.data)},
        "signature": None if resp.signature is None else _b64encode(resp.signature),
        "cached": resp.cached,
    }
    return _dump(obj)


def decode_compile_response(data: bytes) -> CompileResponse:
    """Parse a compile response; raises ProtocolError.

    The module name is checked like a file name, so a client can write it into its
    working directory without further thought.
    """
    what = "compile response"
    obj = _load(data, what)
    module_obj = _get(obj, "module", (dict, type(None)), what)
    module = None
    if module_obj is not None:
        name = check_file_name(_get(module_obj, "name", str, "module"), "module file name")
        text = _get(module_obj, "data", str, "module")
        if len(text) > (MAX_MODULE_BYTES + 2) // 3 * 4:
            raise ProtocolError(f"{what}: module larger than {MAX_MODULE_BYTES} bytes")
        module = Module(name, _b64decode(text, "module data"))
    sig_text = _get(obj, "signature", (str, type(None)), what)
    status = _get(obj, "status", int, what)
    if not 0 <= status <= 255:
        raise ProtocolError(f"{what}: status {status} is not an exit status (0 to 255)")
    stdout = _get(obj, "stdout", str, what)
    stderr = _get(obj, "stderr", str, what)
    if max(len(stdout), len(stderr)) > MAX_STREAM_CHARS:
        raise ProtocolError(f"{what}: stap's output over {MAX_STREAM_CHARS} characters")
    return CompileResponse(
        status=status,
        stdout=stdout,
        stderr=stderr,
        module=module,
        signature=None if sig_text is None else _b64decode(sig_text, "signature"),
        cached=_get(obj, "cached", bool, what),
    )


# --- errors ------------------------------------------------------------------------


def encode_error(message: str) -> bytes:
    """Serialise an error body ``{"error": message}`` (message kept to one line)."""
    return _dump({"error": " ".join(message.split())})


def decode_error(data: bytes) -> str:
    """Return the message of an error body, or a description if it is not one."""
    try:
        obj = _load(data, "error body")
        message = obj.get("error")
    except ProtocolError:
        message = None
    if isinstance(message, str):
        return message
    text = data[:200].decode("utf-8", "replace")
    return " ".join(text.split()) or "(empty error body)"
