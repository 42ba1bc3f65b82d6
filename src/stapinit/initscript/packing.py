"""Deployment of compiled scripts to hosts without a compiler: ``pack`` and ``unpack``.

Spec §5.8 copies ``CACHE_PATH/<release>`` and the scripts' ``conf.d`` files
to the target with tar. ``pack`` writes the same files, checked, into one
gzip'd tar::

    MANIFEST                              format, release, sha256 of each file
    cache/<release>/NAME.bo|NAME.ko|NAME.opts
    conf.d/FILE.conf

and ``unpack`` installs it on the target (run there with AUTOCOMPILE=no and
ALLOW_CACHEONLY=yes). An archive is untrusted input: every member must be a
regular file whose name is one of the shapes above and is listed in the
manifest with its checksum, and all of that is checked before anything is
written. The checks are pure functions; the I/O around them is thin.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tarfile
import time
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stapinit.core.bashvars import ConfigError, parse_assignments
from stapinit.core.fsutil import atomic_write, stage_write
from stapinit.core.lsb import EXIT_OK
from stapinit.core.names import NAME_PATTERN
from stapinit.core.runtime import KIND_OF_SUFFIX, MODULE_SUFFIX
from stapinit.initscript import cache
from stapinit.initscript.cache import CacheRecord, running_kernel, target_kernel
from stapinit.initscript.commands import CommandError, Initscript, Request
from stapinit.initscript.scripts import cache_dir

MANIFEST_NAME = "MANIFEST"
FORMAT_LINE = "systemtap-service pack 1"
RECORD_SUFFIX = ".opts"
# A release becomes a directory name: one path component, never "." or "..".
RELEASE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")
CONF_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\.conf")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_RUNTIME_OF_SUFFIX = KIND_OF_SUFFIX
# Bounds on what unpack reads into memory from an untrusted archive.
MAX_MEMBERS = 4096
MAX_TOTAL_BYTES = 1 << 30


class PackError(Exception):
    """An archive cannot be made or used; str() is one line."""


@dataclass(frozen=True)
class Manifest:
    """The ``MANIFEST`` member: which release, and every other file's sha256."""

    release: str
    checksums: Mapping[str, str]  # archive path -> sha256 hex digest

    def to_text(self) -> str:
        """Serialise: format line, release line, then ``sha256 DIGEST PATH`` lines."""
        lines = [FORMAT_LINE, f"release {self.release}"]
        lines += [f"sha256 {digest} {path}" for path, digest in sorted(self.checksums.items())]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Placement:
    """One file to install, and the files that must go just before it lands."""

    destination: Path
    data: bytes
    removes_first: tuple[Path, ...] = ()


# -- pure checks ---------------------------------------------------------------


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_release(release: str) -> None:
    """Refuse a release that cannot be one directory name."""
    if not RELEASE_PATTERN.fullmatch(release):
        raise PackError(f"{release!r} is not a kernel release name")


def classify(path: str, release: str) -> tuple[str, str]:
    """``("cache", FILE)`` or ``("conf", FILE)`` for an archive path; refuse anything else.

    Only ``cache/<release>/NAME.{ko,bo,opts}`` and ``conf.d/FILE.conf`` exist
    in an archive, so absolute paths, ``..``, ``.`` and other directories are
    refused by shape.
    """
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "cache" and parts[1] == release:
        stem, dot, suffix = parts[2].rpartition(".")
        known = f".{suffix}" in _RUNTIME_OF_SUFFIX or f".{suffix}" == RECORD_SUFFIX
        if dot and known and NAME_PATTERN.fullmatch(stem):
            return "cache", parts[2]
    if len(parts) == 2 and parts[0] == "conf.d" and CONF_PATTERN.fullmatch(parts[1]):
        return "conf", parts[1]
    raise PackError(f"{path!r} is not cache/{release}/NAME.(ko|bo|opts) or conf.d/FILE.conf")


def make_manifest(release: str, files: Mapping[str, bytes]) -> Manifest:
    """The manifest for ``files`` (archive path -> contents)."""
    return Manifest(release, {path: sha256(data) for path, data in files.items()})


def parse_manifest(text: str) -> Manifest:
    """Parse and check a ``MANIFEST``; every path it lists must have a valid shape."""
    lines = text.splitlines()
    if not lines or lines[0] != FORMAT_LINE:
        raise PackError("MANIFEST is not a systemtap-service pack manifest")
    if len(lines) < 2 or not lines[1].startswith("release "):
        raise PackError("MANIFEST names no release")
    release = lines[1].removeprefix("release ")
    check_release(release)
    checksums: dict[str, str] = {}
    for number, line in enumerate(lines[2:], start=3):
        kind, _, rest = line.partition(" ")
        digest, _, path = rest.partition(" ")
        if kind != "sha256" or not _SHA256_PATTERN.fullmatch(digest) or not path:
            raise PackError(f"MANIFEST line {number} is not 'sha256 DIGEST PATH'")
        classify(path, release)
        if path in checksums:
            raise PackError(f"MANIFEST lists {path!r} twice")
        checksums[path] = digest
    return Manifest(release, checksums)


def check_cache_files(release: str, cache_files: Mapping[str, bytes]) -> None:
    """Each module comes with a record of its runtime for ``release``, and vice versa."""
    modules: dict[str, str] = {}
    records: dict[str, bytes] = {}
    for filename, data in cache_files.items():
        stem, _, suffix = filename.rpartition(".")
        if f".{suffix}" == RECORD_SUFFIX:
            records[stem] = data
        elif stem in modules:
            raise PackError(f"{stem} has both a .ko and a .bo module")
        else:
            modules[stem] = f".{suffix}"
    if not modules:
        raise PackError("the archive holds no compiled script")
    for stem, suffix in sorted(modules.items()):
        if stem not in records:
            raise PackError(f"{stem}{suffix} comes without its {stem}{RECORD_SUFFIX} record")
        record = CacheRecord.from_text(records[stem].decode("utf-8", errors="replace"))
        if record is None:
            raise PackError(f"{stem}{RECORD_SUFFIX} is not a cache record")
        if record.kernel.release != release:
            raise PackError(f"{stem}{RECORD_SUFFIX} is for {record.kernel.release}, not {release}")
        if KIND_OF_SUFFIX.get(suffix) != record.runtime:
            raise PackError(f"{stem}{RECORD_SUFFIX} records runtime {record.runtime}, not {suffix}")
    orphans = sorted(set(records) - set(modules))
    if orphans:
        raise PackError(f"{orphans[0]}{RECORD_SUFFIX} comes without a module")


def check_conf_file(path: str, data: bytes, scripts: Collection[str]) -> None:
    """A ``conf.d`` file may only set options and requirements of ``scripts``.

    It is parsed as the service will parse it (a command, ``$(...)`` or
    anything but an assignment is refused with ``PATH:LINE``), and every
    assignment must be ``NAME_OPT`` or ``NAME_REQ`` of a script the archive
    carries: an archive must not change global parameters such as the tool
    paths, nor the options of scripts it does not ship.
    """
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        assignments = parse_assignments(text, path, {})
    except ConfigError as error:
        raise PackError(str(error)) from None
    for assignment in assignments:
        script, _, suffix = assignment.name.rpartition("_")
        if suffix not in ("OPT", "REQ") or script not in scripts:
            raise PackError(
                f"{path}:{assignment.line}: {assignment.name} is not NAME_OPT or NAME_REQ "
                f"of a script in the archive ({', '.join(sorted(scripts))})"
            )


def check_members(members: Mapping[str, bytes]) -> tuple[Manifest, dict[str, bytes]]:
    """Check an archive's files against its manifest; the manifest and the other files.

    Every file must be listed, every listed file present, every checksum
    right, the cache files must form complete module/record pairs, and the
    ``conf.d`` files may only configure the scripts carried.
    """
    if MANIFEST_NAME not in members:
        raise PackError("the archive has no MANIFEST")
    manifest = parse_manifest(members[MANIFEST_NAME].decode("utf-8", errors="replace"))
    files = {path: data for path, data in members.items() if path != MANIFEST_NAME}
    cache_files: dict[str, bytes] = {}
    for path in sorted(files):
        area, filename = classify(path, manifest.release)
        if path not in manifest.checksums:
            raise PackError(f"{path!r} is not listed in MANIFEST")
        if sha256(files[path]) != manifest.checksums[path]:
            raise PackError(f"checksum mismatch for {path!r}")
        if area == "cache":
            cache_files[filename] = files[path]
    for path in sorted(manifest.checksums):
        if path not in files:
            raise PackError(f"MANIFEST lists {path!r}, which the archive lacks")
    check_cache_files(manifest.release, cache_files)
    scripts = {filename.rpartition(".")[0] for filename in cache_files}
    for path in sorted(files):
        if classify(path, manifest.release)[0] == "conf":
            check_conf_file(path, files[path], scripts)
    return manifest, files


def plan(
    manifest: Manifest, files: Mapping[str, bytes], cache_path: Path, config_path: Path
) -> list[Placement]:
    """Where each checked file goes, in a safe order.

    ``conf.d`` files first; then, per script, its module and last its record.
    A module's placement first removes the old record (and a module of the
    other runtime), as :func:`stapinit.initscript.cache.install` does, so the
    cache never holds a record vouching for a module it does not describe.
    """
    release_dir = cache_path / manifest.release
    confs: list[Placement] = []
    modules: list[Placement] = []
    records: dict[str, Placement] = {}
    for path in sorted(files):
        area, filename = classify(path, manifest.release)
        if area == "conf":
            confs.append(Placement(config_path / filename, files[path]))
            continue
        stem, _, suffix = filename.rpartition(".")
        if f".{suffix}" == RECORD_SUFFIX:
            records[stem] = Placement(release_dir / filename, files[path])
        else:
            others = tuple(
                release_dir / f"{stem}{other}"
                for other in MODULE_SUFFIX.values()
                if other != f".{suffix}"
            )
            removes = (cache.record_path(release_dir, stem), *others)
            modules.append(Placement(release_dir / filename, files[path], removes))
    ordered = list(confs)
    for module in modules:
        stem = module.destination.name.rpartition(".")[0]
        ordered += [module, records[stem]]
    return ordered


# -- archive I/O -------------------------------------------------------------


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symbolic link"
    if info.islnk():
        return "hard link"
    if info.isdir():
        return "directory"
    return "special file"


def read_archive(path: Path) -> dict[str, bytes]:
    """Every member of a gzip'd tar, read into memory.

    Refuses anything but regular files, names given twice, and archives
    larger than the bounds above. Names are checked by :func:`check_members`.
    """
    members: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(path, "r:gz") as archive:
            for info in archive:
                if not info.isfile():
                    raise PackError(f"{info.name!r} is a {_kind(info)}, not a regular file")
                if info.name in members:
                    raise PackError(f"{info.name!r} appears twice")
                total += info.size
                if len(members) >= MAX_MEMBERS or total > MAX_TOTAL_BYTES:
                    raise PackError("the archive is larger than any pack archive")
                handle = archive.extractfile(info)
                members[info.name] = handle.read() if handle is not None else b""
    except FileNotFoundError:
        raise PackError("no such file") from None
    except OSError as error:
        raise PackError(f"cannot read: {error.strerror or error}") from None
    except (tarfile.TarError, EOFError, zlib.error) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise PackError(f"not a readable tar.gz archive ({reason})") from None
    return members


def archive_bytes(manifest: Manifest, files: Mapping[str, bytes]) -> bytes:
    """A gzip'd tar of the manifest (first) and ``files``, owned by root, mode 0644."""
    buffer = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        entries = [(MANIFEST_NAME, manifest.to_text().encode())]
        entries += sorted(files.items())
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, now
            info.uname = info.gname = "root"
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _differs(placement: Placement) -> bool:
    try:
        return placement.destination.read_bytes() != placement.data
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True


def _make_parents(directory: Path, created: list[Path]) -> None:
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir()
        created.append(path)


def install(placements: Sequence[Placement]) -> None:
    """Install every file or none: stage all beside their targets, then rename.

    A failure while staging (a full disk, a read-only directory) removes what
    was staged and the directories made for it, leaving the system unchanged.
    """
    for placement in placements:
        target = placement.destination
        if target.is_dir() and not target.is_symlink():
            raise PackError(f"{target} is a directory; nothing installed")
    created: list[Path] = []
    staged: list[Path] = []
    try:
        for placement in placements:
            _make_parents(placement.destination.parent, created)
            staged.append(stage_write(placement.destination, placement.data))
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


# -- the commands --------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CommandError(f"cannot read {path}: {error.strerror}") from None


def pack(initscript: Initscript, request: Request) -> int:
    """Write the caches of ``-r`` (default: running) and their conf.d files to ``-o``.

    Named scripts bring their requirements along: the target could not start
    them otherwise. Every packed cache must be valid for the release.
    """
    assert request.archive is not None
    settings = initscript.settings
    release = request.release or running_kernel().release
    try:
        check_release(release)
    except PackError as error:
        raise CommandError(str(error)) from None
    scripts = initscript.scripts(release)
    if request.scripts:
        names = initscript.select(request._replace(recursive=True), scripts)[0]
    else:
        names = sorted(scripts)
    if not names:
        raise CommandError(f"no scripts to pack in {settings.script_path}")
    chosen = [scripts[name] for name in names]
    directory = cache_dir(settings, release)
    stale = initscript.stale_scripts(chosen, target_kernel(release), directory)
    for name in names:
        if name in stale:
            raise CommandError(
                f"cannot pack {name}: {stale[name]} in {directory} "
                f"(run: systemtap-service compile -r {release} {name})"
            )
    config_path = os.path.normpath(settings.config_path)
    files: dict[str, bytes] = {}
    for script in chosen:
        module = cache.module_path(directory, script.name, script.module_suffix)
        for path in (module, cache.record_path(directory, script.name)):
            files[f"cache/{release}/{path.name}"] = _read(path)
        for suffix in ("OPT", "REQ"):
            assignment = settings.script_var(script.name, suffix)
            if assignment is None:
                continue
            conf = Path(assignment.filename)
            if os.path.normpath(conf.parent) != config_path:
                raise CommandError(
                    f"cannot pack {script.name}: {script.name}_{suffix} is set in {conf}, "
                    f"outside CONFIG_PATH {config_path}; move it to a .conf file there"
                )
            files[f"conf.d/{conf.name}"] = _read(conf)
    manifest = make_manifest(release, files)
    try:
        # What pack writes must pass exactly what unpack will check.
        check_members({MANIFEST_NAME: manifest.to_text().encode(), **files})
    except PackError as error:
        raise CommandError(f"cannot pack: {error}") from None
    try:
        atomic_write(request.archive, archive_bytes(manifest, files))
    except OSError as error:
        raise CommandError(f"cannot write {request.archive}: {error.strerror}") from None
    initscript.log.report(f"Packed {' '.join(names)} for {release} into {request.archive}")
    return EXIT_OK


def unpack(initscript: Initscript, request: Request) -> int:
    """Verify an archive made by :func:`pack` and install it, all or nothing."""
    assert request.archive is not None
    settings = initscript.settings
    try:
        manifest, files = check_members(read_archive(request.archive))
        placements = plan(manifest, files, settings.cache_path, settings.config_path)
    except PackError as error:
        raise CommandError(f"{request.archive}: {error}; nothing installed") from None
    replaced = [placement.destination for placement in placements if _differs(placement)]
    if replaced and not request.assume_yes:
        listing = "\n".join(f"  {path}" for path in replaced)
        print(f"These files will be replaced:\n{listing}", file=initscript.log.out)
        if not initscript.confirm("Replace these files?"):
            raise CommandError("not replacing existing files; nothing installed")
    try:
        install(placements)
    except PackError as error:
        raise CommandError(f"{request.archive}: {error}") from None
    for placement in placements:
        initscript.log.report(f"Installed {placement.destination}")
    if not settings.allow_cacheonly:
        initscript.log.warning(
            "ALLOW_CACHEONLY=no: scripts without a .stp file will not run from these caches"
        )
    return EXIT_OK
