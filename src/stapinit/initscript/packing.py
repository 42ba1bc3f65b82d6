"""Deployment of compiled scripts to hosts without a compiler: ``pack`` and ``unpack``.

Spec §5.8 copies ``CACHE_PATH/<release>`` and the scripts' ``conf.d`` files
to the target with tar. ``pack`` writes the same kind of files, checked, into
one gzip'd ustar archive, for one or several kernel releases::

    MANIFEST                                   format, releases, sha256 of each file
    cache/<release>/NAME.bo|NAME.ko|NAME.opts  module and cache record
    cache/<release>/NAME.bo.sgn|NAME.ko.sgn    the module's signature, when the cache has one
    conf.d/NAME.conf                           NAME_OPT (compile options only) and NAME_REQ

and ``unpack`` installs it on the target (run there with AUTOCOMPILE=no and
ALLOW_CACHEONLY=yes). An archive is untrusted input:

* it is read as a stream with small limits on every header, member and on the
  whole (``MAX_*`` below), checked before anything is allocated; only plain
  ustar regular files are read, so a pax or GNU long-name header claiming
  gigabytes is refused by its type before its body is touched;
* every member must have one of the shapes above and be listed in the
  manifest with its checksum; caches come as module/record pairs;
* a ``conf.d`` file may set only ``NAME_OPT`` and ``NAME_REQ`` of its own
  script, and ``NAME_OPT`` only options from :data:`ARCHIVE_OPTIONS`: compile
  options that name no file and run nothing. Run-time options (``-o``,
  ``-c``, ``-x``, ``-S``, ``-s`` ...) come only from the target's own
  configuration, so an archive can never make root run a command or write a
  file (issue 10 #3). ``pack`` writes these files itself from the build
  host's settings, leaving the run-time options out;
* with ``REQUIRE_SIGNED=yes`` every module to be installed must carry a
  signature that verifies against the target's trusted signers, made for the
  text of the target's own ``SCRIPT_PATH/NAME.stp``;
* only the releases installed on the target (``/lib/modules/<release>``, or
  the running one) built for its architecture are installed.

All of that is checked before anything is written, and then every file is
installed or none. ``pack`` and ``unpack`` run under the service lock (the
command line takes it, see ``cli.COMMANDS``): ``unpack`` writes the cache that
``start`` reads. The checks are pure functions; the I/O around them is thin.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import re
import shlex
import stat
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple, Protocol

from stapinit.core.bashvars import ConfigError, parse_assignments
from stapinit.core.fsutil import stage_write
from stapinit.core.lsb import EXIT_OK
from stapinit.core.names import is_valid_name
from stapinit.core.runtime import KIND_OF_SUFFIX, MODULE_SUFFIX
from stapinit.core.values import is_release
from stapinit.initscript import cache, deps
from stapinit.initscript.cache import (
    CacheRecord,
    KernelIdentity,
    running_kernel,
    target_kernel,
)
from stapinit.initscript.commands import CommandError, Initscript, Request
from stapinit.initscript.kernels import MODULES_DIR
from stapinit.initscript.options import (
    Option,
    OptionError,
    Phase,
    parse_options,
    split_options,
)
from stapinit.initscript.scripts import Script, cache_dir

MANIFEST_NAME = "MANIFEST"
FORMAT_LINE = "systemtap-service pack 1"
RECORD_SUFFIX = ".opts"
# As stapinit.trust.signing.SIGNATURE_SUFFIX; not imported from there, which
# would load the crypto library for every pack and unpack.
SIGNATURE_SUFFIX = ".sgn"
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")

# Bounds on what unpack reads from an untrusted archive, each checked against
# a member's header before its body is read. Modules wait in an anonymous
# temporary file (the spool, in CACHE_PATH); the small files are kept in memory.
MAX_ARCHIVE_BYTES = 256 << 20  # the compressed file
MAX_TOTAL_BYTES = 512 << 20  # all members, decompressed
MAX_MODULE_BYTES = 64 << 20  # one NAME.ko / NAME.bo
MAX_SMALL_BYTES = 64 << 10  # one record, signature or conf.d file
MAX_MANIFEST_BYTES = 1 << 20
MAX_MEMBERS = 1024
MAX_RELEASES = 64
_BLOCK = tarfile.BLOCKSIZE
Warn = Callable[[str], None]
_CHUNK = 1 << 20

# What NAME_OPT in an archive may hold: options that only change how a module
# is compiled (or what the compile prints), that name no file or directory and
# run nothing, on the build host, on the target, or when the target compiles
# again. Flag (as options.parse_options gives it) -> the pattern its value
# must match, or None for an option without a value. Everything else is
# refused (option_refusal): run-time options (phase RUN of options.TABLE:
# -o, -c, -x, -S, -s), options naming paths (-I, -R, -d, --sysroot), reaching
# other programs or hosts (-B, --use-server, --sysenv), adding script text
# (-E), and what the service decides itself (-p, -m, -r, -F, --tmpdir ...).
ARCHIVE_OPTIONS: Mapping[str, str | None] = {
    "--runtime": r"bpf|kernel",
    "--bpf": None,
    "--privilege": r"stapusr|stapsys|stapdev",
    "--unprivileged": None,
    "--compatible": r"[0-9]{1,3}(\.[0-9]{1,3}){0,3}",
    "--vp": r"[0-9]{1,5}",
    "--skip-badvars": None,
    "--suppress-handler-errors": None,
    "--suppress-time-limits": None,
    "--no-global-var-display": None,
    "T": r"[0-9]{1,9}",
    "D": r"[A-Za-z_][A-Za-z0-9_]{0,63}(=[A-Za-z0-9_.+-]{0,64})?",
    "g": None,
    "u": None,
    "w": None,
    "W": None,
    "v": None,
    "P": None,
    "b": None,
    "t": None,
}


class Readable(Protocol):
    """A stream of bytes, such as a :class:`gzip.GzipFile`."""

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes; fewer only at the end."""


class PackError(Exception):
    """An archive cannot be made or used; str() is one line."""


class Blob(NamedTuple):
    """One archive file: its sha256 and size, and its bytes unless it waits in the spool."""

    sha256: str
    size: int
    data: bytes | None = None  # the small files; None for a module
    offset: int = 0  # a module's place in the spool

    @classmethod
    def of(cls, data: bytes) -> Blob:
        """A blob kept in memory."""
        return cls(hashlib.sha256(data).hexdigest(), len(data), data)

    def text(self) -> str:
        """The bytes of a small file, as text."""
        assert self.data is not None, "modules are never read as text"
        return self.data.decode("utf-8", errors="surrogateescape")


@dataclass(frozen=True)
class ArchiveManifest:
    """The ``MANIFEST`` member: which releases, and every other file's sha256."""

    releases: tuple[str, ...]
    checksums: Mapping[str, str]  # archive path -> sha256 hex digest

    def to_text(self) -> str:
        """Serialise: format line, ``release R`` lines, then ``sha256 DIGEST PATH`` lines."""
        lines = [FORMAT_LINE, *(f"release {release}" for release in self.releases)]
        lines += [f"sha256 {digest} {path}" for path, digest in sorted(self.checksums.items())]
        return "\n".join(lines) + "\n"


class Entry(NamedTuple):
    """What an archive path is: its area, release (for cache files) and file name."""

    area: str  # "module", "record", "signature" or "conf"
    release: str  # "" for conf.d files
    filename: str
    script: str


@dataclass(frozen=True)
class Placement:
    """One file to install, and the files that must go just before it lands."""

    destination: Path
    path: str  # in the archive
    removes_first: tuple[Path, ...] = ()


# -- pure checks ---------------------------------------------------------------


def check_release(release: str) -> None:
    """Refuse a release that cannot be one directory name."""
    if not is_release(release):
        raise PackError(f"{release!r} is not a kernel release name")


def _script_name(stem: str) -> bool:
    return is_valid_name(stem)


def classify(path: str, releases: Collection[str]) -> Entry:
    """What ``path`` is in an archive for ``releases``; refuse anything else.

    Only ``cache/<release>/NAME.{ko,bo,opts}``, ``cache/<release>/NAME.{ko,bo}.sgn``
    and ``conf.d/NAME.conf`` exist in an archive, so absolute paths, ``..``,
    ``.`` and other directories are refused by shape.
    """
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "cache" and parts[1] in releases:
        filename = parts[2]
        stem, dot, suffix = filename.partition(".")
        kinds = {RECORD_SUFFIX[1:]: "record"}
        for module_suffix in KIND_OF_SUFFIX:
            kinds[module_suffix[1:]] = "module"
            kinds[module_suffix[1:] + SIGNATURE_SUFFIX] = "signature"
        if dot and suffix in kinds and _script_name(stem):
            return Entry(kinds[suffix], parts[1], filename, stem)
    if len(parts) == 2 and parts[0] == "conf.d":
        stem, dot, suffix = parts[1].partition(".")
        if dot and suffix == "conf" and _script_name(stem):
            return Entry("conf", "", parts[1], stem)
    raise PackError(
        f"{path!r} is not cache/RELEASE/NAME.(ko|bo|opts|ko.sgn|bo.sgn) or conf.d/NAME.conf"
    )


def make_manifest(releases: Sequence[str], files: Mapping[str, Blob]) -> ArchiveManifest:
    """The manifest for ``files`` (archive path -> contents)."""
    return ArchiveManifest(tuple(releases), {path: blob.sha256 for path, blob in files.items()})


def parse_manifest(text: str) -> ArchiveManifest:
    """Parse and check a ``MANIFEST``; every path it lists must have a valid shape."""
    lines = text.splitlines()
    if not lines or lines[0] != FORMAT_LINE:
        raise PackError("MANIFEST is not a systemtap-service pack manifest")
    releases: list[str] = []
    first = 2  # the number of the first line after the release lines
    while first <= len(lines) and lines[first - 1].startswith("release "):
        release = lines[first - 1].removeprefix("release ")
        check_release(release)
        if release in releases:
            raise PackError(f"MANIFEST line {first} names release {release} again")
        releases.append(release)
        first += 1
    if not releases:
        raise PackError("MANIFEST names no release")
    if len(releases) > MAX_RELEASES:
        raise PackError(f"MANIFEST names more than {MAX_RELEASES} releases")
    checksums: dict[str, str] = {}
    for number, line in enumerate(lines[first - 1 :], start=first):
        kind, _, rest = line.partition(" ")
        digest, _, path = rest.partition(" ")
        if kind != "sha256" or not _SHA256_PATTERN.fullmatch(digest) or not path:
            raise PackError(f"MANIFEST line {number} is not 'sha256 DIGEST PATH'")
        classify(path, releases)
        if path in checksums:
            raise PackError(f"MANIFEST lists {path!r} twice")
        checksums[path] = digest
    return ArchiveManifest(tuple(releases), checksums)


def read_record(path: str, blob: Blob) -> CacheRecord:
    """The cache record in ``blob``, or a refusal naming ``path``."""
    record = CacheRecord.from_text(blob.text())
    if record is None:
        raise PackError(f"{path} is not a cache record")
    return record


def check_cache_files(release: str, files: Mapping[str, Blob]) -> set[str]:
    """The scripts of one release: each module comes with its record, and vice versa.

    ``files`` maps the release's archive paths to their blobs. A signature
    must sign a module the archive carries.
    """
    entries = {path: classify(path, (release,)) for path in files}
    modules: dict[str, str] = {}
    records: dict[str, str] = {}
    for path, entry in sorted(entries.items()):
        if entry.area == "record":
            records[entry.script] = path
        elif entry.area == "module":
            if entry.script in modules:
                raise PackError(f"{entry.script} has both a .ko and a .bo module for {release}")
            modules[entry.script] = path
    for path, entry in sorted(entries.items()):
        if entry.area == "signature":
            signed = path.removesuffix(SIGNATURE_SUFFIX)
            if modules.get(entry.script) != signed:
                raise PackError(f"{path} signs {signed}, which the archive lacks")
    if not modules:
        raise PackError(f"the archive holds no compiled script for {release}")
    for script, path in sorted(modules.items()):
        suffix = path[path.rindex(".") :]
        if script not in records:
            raise PackError(f"{path} comes without its {script}{RECORD_SUFFIX} record")
        record = read_record(records[script], files[records[script]])
        if record.kernel.release != release:
            raise PackError(f"{records[script]} is for {record.kernel.release}, not {release}")
        if KIND_OF_SUFFIX.get(suffix) != record.runtime:
            raise PackError(f"{records[script]} records runtime {record.runtime}, not {suffix}")
    orphans = sorted(set(records) - set(modules))
    if orphans:
        raise PackError(f"{records[orphans[0]]} comes without a module")
    return set(modules)


def option_refusal(option: Option) -> str | None:
    """Why an archive may not set ``option`` in ``NAME_OPT``; ``None`` when it may."""
    shown = " ".join(option.words)
    if option.row.phase is Phase.RUN:
        return f"{shown} is a run-time option; only the target's own configuration sets those"
    if option.flag not in ARCHIVE_OPTIONS:
        return f"{shown} is not one of the compile options an archive may set"
    pattern = ARCHIVE_OPTIONS[option.flag]
    if pattern is None and option.value is not None:
        return f"{shown}: this option takes no value"
    if pattern is not None and (option.value is None or not re.fullmatch(pattern, option.value)):
        return f"{shown}: an archive may give this option only a value matching {pattern}"
    return None


def check_conf_file(path: str, data: str, scripts: Collection[str]) -> tuple[str, ...]:
    """``conf.d/NAME.conf`` may set only ``NAME_OPT`` and ``NAME_REQ`` of NAME, a carried script.

    It is parsed as the service will parse it (a command, ``$(...)`` or
    anything but an assignment is refused with ``PATH:LINE``). Its values
    must be literal (no ``$`` or backquote: the target would expand them with
    its own variables), ``NAME_OPT`` may hold only :data:`ARCHIVE_OPTIONS`,
    and ``NAME_REQ`` only scripts the archive carries (a requirement it does
    not carry would keep every boot script from starting). Returns NAME's
    requirements.
    """
    script = path.removeprefix("conf.d/").removesuffix(".conf")
    if script not in scripts:
        raise PackError(f"{path} configures {script}, which the archive does not carry")
    requires: tuple[str, ...] = ()
    for number, line in enumerate(data.splitlines(), start=1):
        if "$" in line or "`" in line:
            raise PackError(f"{path}:{number}: an archive's settings must be literal (no $ or `)")
    try:
        assignments = parse_assignments(data, path, {})
    except ConfigError as error:
        raise PackError(str(error)) from None
    allowed = {f"{script}_OPT", f"{script}_REQ"}
    for assignment in assignments:
        where = f"{path}:{assignment.line}: {assignment.name}"
        if assignment.name not in allowed:
            raise PackError(f"{where} is not {script}_OPT or {script}_REQ")
        if assignment.name.endswith("_REQ"):
            for word in assignment.value.split():
                if not _script_name(word):
                    raise PackError(f"{where}: {word!r} is not a script name")
                if word not in scripts:
                    raise PackError(f"{where}: {word} is not a script the archive carries")
            requires = tuple(assignment.value.split())
            continue
        try:
            options = parse_options(split_options(assignment.value))
        except OptionError as error:
            raise PackError(f"{where}: {error}") from None
        for option in options:
            why = option_refusal(option)
            if why is not None:
                raise PackError(f"{where}: {why}")
    return requires


def check_members(members: Mapping[str, Blob]) -> tuple[ArchiveManifest, dict[str, Blob]]:
    """Check an archive's files against its manifest; the manifest and the other files.

    Every file must be listed, every listed file present, every checksum
    right, the cache files of each release must form complete module/record
    pairs, and the ``conf.d`` files may only set what :func:`check_conf_file` allows.
    """
    if MANIFEST_NAME not in members:
        raise PackError("the archive has no MANIFEST")
    manifest = parse_manifest(members[MANIFEST_NAME].text())
    files = {path: blob for path, blob in members.items() if path != MANIFEST_NAME}
    for path in sorted(files):
        classify(path, manifest.releases)
        if path not in manifest.checksums:
            raise PackError(f"{path!r} is not listed in MANIFEST")
        if files[path].sha256 != manifest.checksums[path]:
            raise PackError(f"checksum mismatch for {path!r}")
    for path in sorted(manifest.checksums):
        if path not in files:
            raise PackError(f"MANIFEST lists {path!r}, which the archive lacks")
    scripts: set[str] = set()
    for release in manifest.releases:
        prefix = f"cache/{release}/"
        in_release = {p: blob for p, blob in files.items() if p.startswith(prefix)}
        scripts |= check_cache_files(release, in_release)
    requires: dict[str, tuple[str, ...]] = {name: () for name in scripts}
    for path in sorted(files):
        if path.startswith("conf.d/"):
            script = path.removeprefix("conf.d/").removesuffix(".conf")
            requires[script] = check_conf_file(path, files[path].text(), scripts)
    try:
        deps.start_order(requires, requires)
    except deps.DependencyError as error:
        raise PackError(f"the archive's conf.d files: {error}") from None
    return manifest, files


def archive_conf(script: Script) -> tuple[str, list[str]]:
    """``conf.d/NAME.conf`` for an archive, and the options it leaves out.

    ``NAME_OPT`` keeps the runtime selection and the compile options (phase
    COMPILE: those the cache record holds, so the target judges the cache as
    the build host does) and the allowed report options (-v, -w, --vp: they
    change only what a compile prints, so neither the record nor a server's
    signature holds them, and a target that compiles again prints as the
    build host does). Run-time options and other report options stay
    behind, for the target's own configuration; options the service decides
    itself are dropped. Raises :class:`PackError` for a compile option an
    archive may not carry.
    """
    words = ["--runtime=bpf"] if script.runtime == "bpf" else []
    left_out: list[str] = []
    for option in script.options:
        phase = option.row.phase
        allowed = option_refusal(option) is None
        if phase is Phase.COMPILE and not allowed:
            raise PackError(f"{script.name}_OPT: {option_refusal(option)}")
        if phase in (Phase.COMPILE, Phase.REPORT) and allowed:
            words += option.words
        elif phase in (Phase.RUN, Phase.REPORT):
            left_out.append(" ".join(option.words))
    lines = [
        f"# {script.name}: written by systemtap-service pack; compile options only.",
        f"{script.name}_OPT={shlex.quote(shlex.join(words))}",
        f"{script.name}_REQ={shlex.quote(' '.join(script.requires))}",
    ]
    return "\n".join(lines) + "\n", left_out


def match_host(
    manifest: ArchiveManifest, files: Mapping[str, Blob], installed: Collection[str], machine: str
) -> tuple[list[str], dict[str, str]]:
    """The releases to install on this host, and why each other one is skipped.

    A release is installed when it is installed here (``installed``) and its
    caches were built for this host's architecture (``machine``, ``uname -m``).
    Raises :class:`PackError` when no release matches.
    """
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for release in manifest.releases:
        machines = {
            read_record(path, blob).kernel.machine
            for path, blob in files.items()
            if path.startswith(f"cache/{release}/") and path.endswith(RECORD_SUFFIX)
        }
        if release not in installed:
            skipped[release] = "not installed on this host"
        elif machines != {machine}:
            skipped[release] = f"built for {' '.join(sorted(machines))}, this host is {machine}"
        else:
            chosen.append(release)
    if not chosen:
        reasons = "; ".join(f"{release}: {why}" for release, why in skipped.items())
        raise PackError(f"no release in the archive is for this host ({reasons})")
    return chosen, skipped


def plan(
    files: Mapping[str, Blob], releases: Sequence[str], cache_path: Path, config_path: Path
) -> list[Placement]:
    """Where each checked file of ``releases`` goes, in a safe order.

    ``conf.d`` files first; then, per script, its module, its signature and
    last its record. A module's placement first removes the old record, a
    module of the other runtime and old signatures, as
    :func:`stapinit.initscript.cache.install` does, so the cache never holds a
    record vouching for a module it does not describe.
    """
    ordered = [
        Placement(config_path / entry.filename, path)
        for path, entry in sorted((p, classify(p, releases)) for p in files if p.startswith("conf"))
    ]
    for release in releases:
        directory = cache_path / release
        entries = {p: classify(p, releases) for p in files if p.startswith(f"cache/{release}/")}
        for path, entry in sorted(entries.items()):
            if entry.area != "module":
                continue
            olds = [directory / f"{entry.script}{suffix}" for suffix in MODULE_SUFFIX.values()]
            removes = (
                cache.record_path(directory, entry.script),
                *(old for old in olds if old.name != entry.filename),
                *(old.with_name(old.name + SIGNATURE_SUFFIX) for old in olds),
            )
            ordered.append(Placement(directory / entry.filename, path, removes))
            signature = path + SIGNATURE_SUFFIX
            if signature in files:
                ordered.append(
                    Placement(directory / (entry.filename + SIGNATURE_SUFFIX), signature)
                )
            record = f"cache/{release}/{entry.script}{RECORD_SUFFIX}"
            ordered.append(Placement(directory / (entry.script + RECORD_SUFFIX), record))
    return ordered


# -- reading an archive, bounded -------------------------------------------------


def _kind(info: tarfile.TarInfo) -> str:
    kinds = {
        tarfile.SYMTYPE: "symbolic link",
        tarfile.LNKTYPE: "hard link",
        tarfile.DIRTYPE: "directory",
        tarfile.FIFOTYPE: "FIFO",
        tarfile.CHRTYPE: "character device",
        tarfile.BLKTYPE: "block device",
        tarfile.CONTTYPE: "contiguous file",
        tarfile.XHDTYPE: "pax extended header",
        tarfile.XGLTYPE: "pax global header",
        tarfile.SOLARIS_XHDTYPE: "pax extended header",
        tarfile.GNUTYPE_LONGNAME: "GNU long-name header",
        tarfile.GNUTYPE_LONGLINK: "GNU long-link header",
        tarfile.GNUTYPE_SPARSE: "sparse file",
    }
    return kinds.get(info.type, "special file")


def member_limit(name: str) -> int:
    """The most bytes the member ``name`` may have: modules are big, the rest small."""
    if name == MANIFEST_NAME:
        return MAX_MANIFEST_BYTES
    if name.endswith(tuple(KIND_OF_SUFFIX)):
        return MAX_MODULE_BYTES
    return MAX_SMALL_BYTES


def _unreadable(error: BaseException) -> PackError:
    reason = (str(error).splitlines() or [type(error).__name__])[0] or type(error).__name__
    return PackError(f"not a readable tar.gz archive ({reason})")


def _read_exact(stream: Readable, size: int) -> bytes:
    """``size`` bytes of the decompressed stream; a short read is a truncated archive."""
    try:
        data = stream.read(size)
    except (OSError, EOFError, zlib.error) as error:
        raise _unreadable(error) from None
    if len(data) != size:
        raise PackError("not a readable tar.gz archive (it ends in the middle of a member)")
    return data


def _read_header(stream: Readable) -> bytes | None:
    """The next 512-byte header; ``None`` at the end of the stream."""
    try:
        first = stream.read(_BLOCK)
    except (OSError, EOFError, zlib.error) as error:
        raise _unreadable(error) from None
    if not first:
        return None
    return first + (_read_exact(stream, _BLOCK - len(first)) if len(first) < _BLOCK else b"")


def _read_body(stream: Readable, size: int, spool: IO[bytes] | None) -> Blob:
    """Read one member's body (and padding), hashing it, into memory or the spool."""
    digest = hashlib.sha256()
    kept = bytearray()
    offset = spool.tell() if spool is not None else 0
    left = size
    while left:
        chunk = _read_exact(stream, min(left, _CHUNK))
        digest.update(chunk)
        left -= len(chunk)
        if spool is None:
            kept += chunk
            continue
        try:
            spool.write(chunk)
        except OSError as error:
            raise PackError(f"cannot hold the archive's modules: {error.strerror}") from None
    _read_exact(stream, -size % _BLOCK)
    if spool is None:
        return Blob(digest.hexdigest(), size, bytes(kept))
    return Blob(digest.hexdigest(), size, None, offset)


def read_members(stream: Readable, spool: IO[bytes]) -> dict[str, Blob]:
    """Every member of a decompressed tar stream, read within the limits above.

    Headers are parsed one by one with :meth:`tarfile.TarInfo.frombuf`; a
    member's type, name and size are checked before its body is read, and
    only regular files are. Modules go to ``spool``, the rest stays in memory.
    Reading stops at the end-of-archive block.
    """
    members: dict[str, Blob] = {}
    total = 0
    while (header := _read_header(stream)) is not None and header.count(0) != _BLOCK:
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except (tarfile.HeaderError, ValueError) as error:
            raise _unreadable(error) from None
        name = info.name
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise PackError(f"{name!r} is a {_kind(info)}, not a regular file")
        if name in members:
            raise PackError(f"{name!r} appears twice")
        if len(members) >= MAX_MEMBERS:
            raise PackError(f"the archive has more than {MAX_MEMBERS} members")
        limit = member_limit(name)
        if not 0 <= info.size <= limit:
            raise PackError(f"{name!r} claims {info.size} bytes; such a file may have {limit}")
        total += info.size
        if total > MAX_TOTAL_BYTES:
            raise PackError(f"the archive holds more than {MAX_TOTAL_BYTES} bytes")
        is_module = limit == MAX_MODULE_BYTES
        members[name] = _read_body(stream, info.size, spool if is_module else None)
    return members


def _open_regular(path: Path, limit: int, follow: bool) -> IO[bytes]:
    """Open a regular file of at most ``limit`` bytes for reading, never blocking on a FIFO.

    ``follow=False`` also refuses a symbolic link.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise PackError("no such file") from None
    except OSError as error:
        raise PackError(f"cannot read: {error.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise PackError("not a regular file")
    if info.st_size > limit:
        os.close(fd)
        raise PackError(f"larger than {limit} bytes")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_archive(path: Path, spool: IO[bytes]) -> dict[str, Blob]:
    """Every member of the gzip'd tar at ``path``, read within the limits above.

    Raises :class:`PackError` (one line) for anything that is not such an
    archive: this is the only way it fails, whatever the bytes.
    """
    with _open_regular(path, MAX_ARCHIVE_BYTES, follow=True) as handle:
        try:
            with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
                return read_members(stream, spool)
        except (OSError, EOFError, zlib.error) as error:  # raised when closing
            raise _unreadable(error) from None


def blob_bytes(blob: Blob, spool: IO[bytes]) -> bytes:
    """The bytes of ``blob``, from memory or the spool."""
    if blob.data is not None:
        return blob.data
    parts: list[bytes] = []
    done = 0
    while done < blob.size:
        part = os.pread(spool.fileno(), blob.size - done, blob.offset + done)
        if not part:
            raise PackError("the spooled module is shorter than its member")
        parts.append(part)
        done += len(part)
    return b"".join(parts)


def _spool(stack: contextlib.ExitStack, directory: Path) -> IO[bytes]:
    """An anonymous temporary file in ``directory``, gone when the command ends."""
    try:
        return stack.enter_context(tempfile.TemporaryFile(dir=directory, buffering=0))
    except OSError as error:
        raise CommandError(
            f"cannot create a temporary file in {directory}: {error.strerror}"
        ) from None


# -- signatures ----------------------------------------------------------------


def archived_script(files: Mapping[str, Blob], path: str) -> Script:
    """The script whose module is at ``path``, as the target will see it once unpacked.

    Its options come from the archive's ``conf.d/NAME.conf`` (checked), its
    runtime from the module's suffix; run-time options the target adds do not
    change what a signature must cover.
    """
    entry = classify(path, (path.split("/")[1],))
    options: tuple[Option, ...] = ()
    conf = files.get(f"conf.d/{entry.script}.conf")
    if conf is not None:
        for assignment in parse_assignments(conf.text(), "conf", {}):
            if assignment.name == f"{entry.script}_OPT":
                options = tuple(parse_options(split_options(assignment.value)))
    kind = KIND_OF_SUFFIX[entry.filename[entry.filename.rindex(".") :]]
    return Script(entry.script, None, options, (), kind)


def verify_signatures(
    files: Mapping[str, Blob],
    releases: Sequence[str],
    spool: IO[bytes],
    machine: str,
    warn: Warn,
    script_path: Path,
) -> int:
    """Check every module of ``releases`` as ``start`` will with REQUIRE_SIGNED=yes.

    Each module needs its ``.sgn``, made by a signer trusted in
    ``/etc/systemtap/staprun/`` (:mod:`stapinit.initscript.verify`), over this
    very module, for its name, release, ``machine``, runtime, privilege and the
    compile options its ``conf.d`` file gives it (phase COMPILE, those its
    record holds: report options such as -w are not signed), compiled from the
    text of the target's own ``script_path/NAME.stp`` and the tapsets of the
    ``-I`` directories its ``conf.d`` file names, on the target
    (:func:`stapinit.initscript.verify.host_source`: an archive may set no
    ``-I``, so a module compiled with tapsets is refused; a module whose script
    is not there is refused: nothing else says it is the admin's). Raises :class:`PackError`
    naming the first module that fails; returns how many verified. The crypto
    library is imported only here.
    """
    from stapinit.initscript import verify
    from stapinit.initscript.remote import RemoteError
    from stapinit.protocol import ProtocolError
    from stapinit.trust.stores import StorePaths

    store = StorePaths.default()
    certificates = verify.trusted_signers(store, warn)
    in_releases = [p for p in files if p.startswith("cache/") and p.split("/")[1] in releases]
    modules = [
        (p, entry) for p in sorted(in_releases) if (entry := classify(p, releases)).area == "module"
    ]
    for path, entry in modules:
        signature = files.get(path + SIGNATURE_SUFFIX)
        if signature is None or signature.data is None:
            raise PackError(f"{path} is not signed, and REQUIRE_SIGNED=yes")
        if not certificates:
            raise PackError(f"{path}: no trusted signer in {store.signers} (REQUIRE_SIGNED=yes)")
        kernel = KernelIdentity(entry.release, "", machine)
        script_file = script_path / f"{entry.script}.stp"
        if not os.path.lexists(script_file):
            raise PackError(f"{path}: {verify.no_script(entry.script)} ({script_file})")
        try:
            archived = archived_script(files, path)
            source = verify.host_source(archived, script_file)
            expected = verify.expected_manifest(archived, kernel, source)
        except OSError as error:
            raise PackError(f"{path}: cannot read {script_file}: {error.strerror}") from None
        except (RemoteError, ProtocolError) as error:
            raise PackError(f"{path}: {error}") from None
        module = blob_bytes(files[path], spool)
        problem = verify.check(signature.data, module, certificates, expected)
        if problem is not None:
            raise PackError(f"{path}: {problem}")
    return len(modules)


# -- installing ------------------------------------------------------------------


def _differs(placement: Placement, blob: Blob) -> bool:
    """True when the destination exists with other contents (or cannot be compared)."""
    if not os.path.lexists(placement.destination):
        return False
    try:
        handle = _open_regular(placement.destination, blob.size, follow=False)
    except PackError:
        return True
    digest = hashlib.sha256()
    with handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() != blob.sha256


_FILE_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
}


def _make_parents(directory: Path, created: list[Path]) -> None:
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir()
        created.append(path)


def check_destinations(placements: Sequence[Placement]) -> None:
    """Refuse when a destination exists and is not a regular file.

    Only a regular file is ever replaced: a link, FIFO or directory there is
    someone's deliberate choice (and renaming over a link would drop it).
    """
    for placement in placements:
        try:
            mode = placement.destination.lstat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISREG(mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise PackError(f"{placement.destination} is {kind}; nothing installed")


def install(placements: Sequence[Placement], files: Mapping[str, Blob], spool: IO[bytes]) -> None:
    """Install every file or none: stage all beside their targets, then rename.

    A failure while staging (a full disk, a read-only directory) removes what
    was staged and the directories made for it, leaving the system unchanged.
    """
    check_destinations(placements)
    created: list[Path] = []
    staged: list[Path] = []
    try:
        for placement in placements:
            _make_parents(placement.destination.parent, created)
            data = blob_bytes(files[placement.path], spool)
            staged.append(stage_write(placement.destination, data))
    except OSError as error:
        for temp in staged:
            temp.unlink(missing_ok=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        where = error.filename or "the target"
        raise PackError(f"cannot write {where}: {error.strerror}; nothing installed") from None
    for index, (placement, temp) in enumerate(zip(placements, staged, strict=True)):
        try:
            for old in placement.removes_first:
                old.unlink(missing_ok=True)
            os.replace(temp, placement.destination)
        except OSError as error:
            for left in staged[index:]:
                left.unlink(missing_ok=True)
            raise PackError(
                f"cannot install {placement.destination}: {error.strerror}; partly installed"
            ) from None


def installed_releases(running: str, modules_dir: Path = MODULES_DIR) -> set[str]:
    """The kernel releases installed here: ``modules_dir/<release>`` and the running one."""
    try:
        found = {entry.name for entry in modules_dir.iterdir() if entry.is_dir()}
    except OSError:
        found = set()
    return found | {running}


# -- writing an archive -----------------------------------------------------------


def spool_file(path: Path, spool: IO[bytes], keep: bool) -> Blob:
    """A local cache file as a blob: kept in memory (``keep``) or copied to the spool.

    The file is opened without following a symbolic link or blocking, must be
    regular and within the size an archive may hold for it.
    """
    limit = member_limit(path.name)
    try:
        handle = _open_regular(path, limit, follow=False)
    except PackError as error:
        raise CommandError(f"cannot pack {path}: {error}") from None
    digest = hashlib.sha256()
    kept = bytearray()
    offset = spool.seek(0, os.SEEK_END)
    size = 0
    with handle:
        while chunk := handle.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise CommandError(f"cannot pack {path}: larger than {limit} bytes")
            digest.update(chunk)
            if keep:
                kept += chunk
            else:
                spool.write(chunk)
    return Blob(digest.hexdigest(), size, bytes(kept) if keep else None, offset)


def write_archive(
    target: IO[bytes], manifest: ArchiveManifest, files: Mapping[str, Blob], spool: IO[bytes]
) -> None:
    """A gzip'd ustar archive: the manifest first, then ``files``, owned by root, mode 0644.

    ustar holds every name pack writes without pax or GNU extension headers,
    which unpack refuses.
    """
    now = int(time.time())
    with tarfile.open(fileobj=target, mode="w:gz", format=tarfile.USTAR_FORMAT) as archive:
        entries = [(MANIFEST_NAME, Blob.of(manifest.to_text().encode()))]
        for name, blob in [*entries, *sorted(files.items())]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = blob.size, 0o644, now
            info.uname = info.gname = "root"
            if blob.data is not None:
                archive.addfile(info, io.BytesIO(blob.data))
            else:
                spool.seek(blob.offset)
                archive.addfile(info, spool)


def _write_output(path: Path, fill: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temp file beside it; never replace what is not a regular file.

    A symbolic link, FIFO, device or directory at ``path`` is refused (and a
    FIFO never opened, so nothing blocks).
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:
        raise CommandError(f"cannot write {path}: {error.strerror}") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise CommandError(f"refusing to replace {path}: it is {kind}")
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise CommandError(f"cannot write {path}: {error.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            # By descriptor: the directory may be another user's, who can swap in a symlink.
            os.fchmod(handle.fileno(), 0o644)
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CommandError(f"cannot write {path}: {error.strerror}") from None
        raise


# -- the commands --------------------------------------------------------------


def _pack_releases(request: Request) -> list[str]:
    named = request.releases or ((request.release,) if request.release else ())
    return list(dict.fromkeys(named)) or [running_kernel().release]


def pack(initscript: Initscript, request: Request) -> int:
    """Write the caches of each ``-r`` (default: running) and their settings to ``-o``.

    Named scripts bring their requirements along: the target could not start
    them otherwise. Every packed cache must be valid for every release.
    """
    with contextlib.ExitStack() as stack:
        return _pack(initscript, request, _spool(stack, initscript.settings.temp_path))


def _pack(initscript: Initscript, request: Request, spool: IO[bytes]) -> int:
    assert request.archive is not None
    settings = initscript.settings
    releases = _pack_releases(request)
    for release in releases:
        try:
            check_release(release)
        except PackError as error:
            raise CommandError(str(error)) from None
    # The scripts are chosen once, for the first release; every release must
    # have a valid cache of each, so that the archive serves every host alike.
    scripts = initscript.scripts(releases[0])
    if request.scripts:
        names = initscript.select(request._replace(recursive=True), scripts)[0]
    else:
        names = sorted(scripts)
    if not names:
        raise CommandError(f"no scripts to pack in {settings.script_path}")
    files: dict[str, Blob] = {}
    chosen: list[Script] = []
    for release in releases:
        in_release = initscript.scripts(release) if release != releases[0] else scripts
        chosen = [in_release[name] for name in names if name in in_release]
        directory = cache_dir(settings, release)
        stale = initscript.stale_scripts(chosen, target_kernel(release), directory)
        for name in names:
            why = stale.get(name, None if name in in_release else "no compiled module")
            if why is not None:
                raise CommandError(
                    f"cannot pack {name}: {why} in {directory} "
                    f"(run: systemtap-service compile -r {release} {name})"
                )
        for script in chosen:
            module = cache.module_path(directory, script.name, script.module_suffix)
            files[f"cache/{release}/{module.name}"] = spool_file(module, spool, keep=False)
            record = cache.record_path(directory, script.name)
            files[f"cache/{release}/{record.name}"] = spool_file(record, spool, keep=True)
            signature = module.with_name(module.name + SIGNATURE_SUFFIX)
            if os.path.lexists(signature):
                files[f"cache/{release}/{signature.name}"] = spool_file(signature, spool, True)
    for script in chosen:
        try:
            text, left_out = archive_conf(script)
        except PackError as error:
            raise CommandError(f"cannot pack {script.name}: {error}") from None
        files[f"conf.d/{script.name}.conf"] = Blob.of(text.encode())
        if left_out:
            initscript.log.warning(
                f"{script.name}: options left out of the archive: {' '.join(left_out)}; "
                "set them in the target's own configuration"
            )
    manifest = make_manifest(releases, files)
    try:
        # What pack writes must pass exactly what unpack will check.
        check_members({MANIFEST_NAME: Blob.of(manifest.to_text().encode()), **files})
    except PackError as error:
        raise CommandError(f"cannot pack: {error}") from None
    _write_output(request.archive, lambda handle: write_archive(handle, manifest, files, spool))
    packed = " ".join(script.name for script in chosen)
    message = f"Packed {packed} for {' '.join(releases)} into {request.archive}"
    initscript.log.report(message)
    return EXIT_OK


def unpack(initscript: Initscript, request: Request) -> int:
    """Verify an archive made by :func:`pack` and install what is for this host, all or nothing."""
    settings = initscript.settings
    # The modules wait where they will land, rather than in TEMP_PATH, which
    # is often a tmpfs: a hostile archive must not fill memory that way either.
    where = settings.cache_path if settings.cache_path.is_dir() else settings.temp_path
    with contextlib.ExitStack() as stack:
        return _unpack(initscript, request, _spool(stack, where))


def _unpack(initscript: Initscript, request: Request, spool: IO[bytes]) -> int:
    assert request.archive is not None
    settings = initscript.settings
    uname = os.uname()
    try:
        manifest, files = check_members(read_archive(request.archive, spool))
        releases, skipped = match_host(
            manifest, files, installed_releases(uname.release), uname.machine
        )
        if settings.require_signed:
            count = verify_signatures(
                files, releases, spool, uname.machine, initscript.log.warning, settings.script_path
            )
            initscript.log.info(f"Verified the signatures of {count} modules")
        placements = plan(files, releases, settings.cache_path, settings.config_path)
        check_destinations(placements)
    except PackError as error:
        message = str(error).removesuffix("; nothing installed")
        raise CommandError(f"{request.archive}: {message}; nothing installed") from None
    for release, why in skipped.items():
        initscript.log.report(f"Skipped {release}: {why}")
    replaced = [p.destination for p in placements if _differs(p, files[p.path])]
    if replaced and not request.assume_yes:
        listing = "\n".join(f"  {path}" for path in replaced)
        print(f"These files will be replaced:\n{listing}", file=initscript.log.out)
        if not initscript.confirm("Replace these files?"):
            raise CommandError("not replacing existing files; nothing installed")
    try:
        install(placements, files, spool)
    except PackError as error:
        raise CommandError(f"{request.archive}: {error}") from None
    for placement in placements:
        initscript.log.report(f"Installed {placement.destination}")
    if not settings.allow_cacheonly:
        initscript.log.warning(
            "ALLOW_CACHEONLY=no: scripts without a .stp file will not run from these caches"
        )
    return EXIT_OK
