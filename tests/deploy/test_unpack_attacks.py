"""The attacks of issue 10 (#3, #8) and 13 on pack and unpack, performed for real.

Run as root, like the service: a hostile archive must not make root run a
command, write a file or commit memory; pack must not replace what is not a
regular file; both wait for the service lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.conftest import TICK, Hosts, listed, write_tar
from tests.support.prefix import COMMAND, RELEASE, Prefix

GIB = 1 << 30
RSS_LIMIT = 100 << 20

# Runs a command and reports the peak RSS of that command alone (its only child).
_MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[2:], timeout=300)
with open(sys.argv[1], "w") as report:
    report.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(done.returncode)
"""


def run_measured(prefix: Prefix, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the command with ``prefix``'s config; its result and its peak RSS in bytes."""
    report = prefix.root / "rss"
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(report), COMMAND, *args, "-c", str(prefix.config)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=360,
    )
    return done, int(report.read_text())


def tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, kind, 0o644
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def zeros_member(size: int) -> bytes:
    """A gzip member of ``size`` zero bytes (about 1000 times smaller)."""
    return gzip.compress(bytes(size), compresslevel=6)


def bomb(path: Path, members: list[tuple[bytes, int]]) -> None:
    """A multi-member .tgz: each tar header in its own gzip member, then its body of zeros.

    Every body is a repeat of one 64 MiB gzip'd block of zeros, so the file
    stays around a thousandth of what it claims and takes no time to make.
    """
    chunk = 64 << 20
    block = zeros_member(chunk)
    with path.open("wb") as out:
        for header, body in members:
            out.write(gzip.compress(header))
            for _ in range(body // chunk):
                out.write(block)
            if body % chunk:
                out.write(zeros_member(body % chunk))


BOMBS = {
    # The reported one: a GNU long-name header claiming 1.5 GiB, with its 1.5 GiB.
    "GNU long-name header": (
        [(tar_header("././@LongLink", 3 * GIB // 2, tarfile.GNUTYPE_LONGNAME), 3 * GIB // 2)],
        "'././@LongLink' is a GNU long-name header, not a regular file",
    ),
    "pax extended header": (
        [(tar_header("././@PaxHeader", 3 * GIB // 2, tarfile.XHDTYPE), 3 * GIB // 2)],
        "'././@PaxHeader' is a pax extended header, not a regular file",
    ),
    "module member": (
        [(tar_header(f"cache/{RELEASE}/tick.bo", 3 * GIB // 2), 3 * GIB // 2)],
        f"'cache/{RELEASE}/tick.bo' claims 1610612736 bytes; such a file may have 67108864",
    ),
    # Members within their own limit, until the whole is too big: the modules
    # wait in an anonymous file in CACHE_PATH, never in memory.
    "modules adding up": (
        [(tar_header(f"cache/{RELEASE}/m{n}.bo", 60 << 20), 60 << 20) for n in range(9)],
        "the archive holds more than 536870912 bytes",
    ),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_a_small_archive_claiming_gigabytes_is_refused_in_little_memory(
    hosts: Hosts, case: str
) -> None:
    members, why = BOMBS[case]
    archive = hosts.root / "bomb.tgz"
    bomb(archive, members)
    assert archive.stat().st_size < 2 << 20
    done, peak = run_measured(hosts.target, "unpack", "-y", str(archive))
    assert done.returncode == 1
    assert done.stderr == f"systemtap-service: {archive}: {why}; nothing installed\n"
    assert peak < RSS_LIMIT, f"unpack peaked at {peak >> 20} MiB"
    print(f"{case}: refused at a peak RSS of {peak >> 20} MiB")
    # Nothing is left: the modules waited in an anonymous file in CACHE_PATH.
    assert list((hosts.target.root / "cache").iterdir()) == []
    assert list((hosts.target.root / "tmp").iterdir()) == []


def test_an_archive_cannot_make_root_run_a_command_or_write_a_file(
    hosts: Hosts, packed: dict[str, bytes]
) -> None:
    proof = hosts.root / "PROOF"
    root_only = hosts.root / "root-only"
    root_only.write_text("root's own\n")
    root_only.chmod(0o600)
    # The reported archive: a valid cache of tick, whose conf.d file adds a
    # command and an output file to tick's options.
    evil = (
        f'tick_OPT=\'--runtime=bpf -c "/bin/sh -c \\"id > {proof}\\"" -o {root_only}\'\n'
        "tick_REQ=''\n"
    )
    archive = hosts.root / "evil.tgz"
    write_tar(archive, listed({**packed, "conf.d/tick.conf": evil.encode()}))

    refused = hosts.target.run("unpack", "-y", str(archive))
    assert refused.returncode == 1
    assert refused.stderr == (
        f"systemtap-service: {archive}: conf.d/tick.conf:1: tick_OPT: "
        f'-c /bin/sh -c "id > {proof}" is a run-time option; '
        "only the target's own configuration sets those; nothing installed\n"
    )
    assert not (hosts.target.root / "conf.d" / "tick.conf").exists()
    assert not hosts.target.cache_dir().exists()

    # The same attack on a target that already runs tick from a good archive.
    good = hosts.root / "good.tgz"
    write_tar(good, listed(packed))
    assert hosts.target.run("unpack", "-y", str(good)).returncode == 0
    again = hosts.target.run("unpack", "-y", str(archive))
    assert again.returncode == 1 and again.stderr.endswith("; nothing installed\n")
    started = hosts.target.run("start")
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("Started tick")
    assert hosts.target.run("stop").returncode == 0
    assert not proof.exists()
    assert root_only.read_text() == "root's own\n"


@pytest.fixture
def compiled(hosts: Hosts) -> Hosts:
    """The build host with tick compiled for the running kernel."""
    hosts.build.add_script("tick", TICK, options="--runtime=bpf")
    done = hosts.build.run("compile", "-y")
    assert done.returncode == 0, done.stderr
    return hosts


@pytest.mark.parametrize("kind", ["symbolic link", "dangling link", "FIFO", "directory"])
def test_pack_never_replaces_what_is_not_a_regular_file(compiled: Hosts, kind: str) -> None:
    out = compiled.root / "out.tgz"
    victim = compiled.root / "victim"
    victim.write_text("keep me\n")
    if kind == "symbolic link":
        out.symlink_to(victim)
    elif kind == "dangling link":
        out.symlink_to(compiled.root / "nowhere")
    elif kind == "FIFO":
        os.mkfifo(out)
    else:
        out.mkdir()
    done = compiled.build.run("pack", "-o", str(out), timeout=30)  # a FIFO must not block it
    assert done.returncode == 1
    what = "a symbolic link" if "link" in kind else f"a {kind}"
    assert done.stderr == f"systemtap-service: refusing to replace {out}: it is {what}\n"
    assert victim.read_text() == "keep me\n"
    assert not (compiled.root / "nowhere").exists()
    mode = out.lstat().st_mode
    expected = {"FIFO": stat.S_ISFIFO, "directory": stat.S_ISDIR}.get(kind, stat.S_ISLNK)
    assert expected(mode)
    assert [p.name for p in compiled.root.iterdir() if p.name.startswith(".out")] == []


def test_pack_replaces_a_regular_file(compiled: Hosts) -> None:
    out = compiled.root / "out.tgz"
    out.write_text("old\n")
    done = compiled.build.run("pack", "-o", str(out))
    assert done.returncode == 0, done.stderr
    with tarfile.open(out) as archive:
        assert "MANIFEST" in archive.getnames()


@contextlib.contextmanager
def lock_held(prefix: Prefix) -> Iterator[None]:
    """Another systemtap-service holds ``prefix``'s service lock; commands wait a second."""
    prefix.write_config(LOCK_TIMEOUT="1")
    fd = os.open(prefix.stat / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"pid 1: start\n", 0)
        yield
    finally:
        os.close(fd)


def gave_up(prefix: Prefix) -> str:
    lock = prefix.stat / ".lock"
    holder = f"another systemtap-service holds {lock} (pid 1: start)"
    return f"systemtap-service: {holder}; gave up after 1s\n"


def test_pack_waits_for_the_service_lock(compiled: Hosts) -> None:
    archive = compiled.root / "out.tgz"
    with lock_held(compiled.build):
        waited = compiled.build.run("pack", "-o", str(archive))
    assert (waited.returncode, waited.stderr) == (1, gave_up(compiled.build))
    assert not archive.exists()
    assert compiled.build.run("pack", "-o", str(archive)).returncode == 0


def test_unpack_waits_for_the_service_lock(hosts: Hosts, packed: dict[str, bytes]) -> None:
    archive = hosts.root / "good.tgz"
    write_tar(archive, listed(packed))
    with lock_held(hosts.target):
        waited = hosts.target.run("unpack", "-y", str(archive))
    assert (waited.returncode, waited.stderr) == (1, gave_up(hosts.target))
    assert not hosts.target.cache_dir().exists()
    assert hosts.target.run("unpack", "-y", str(archive)).returncode == 0


FLEET = "0.0.0-fleet"  # a release no host here has installed


def test_pack_takes_several_releases_and_unpack_installs_what_this_host_runs(
    compiled: Hosts,
) -> None:
    build = compiled.build
    archive = compiled.root / "fleet.tgz"
    missing = build.run("pack", "-r", RELEASE, "-r", FLEET, "-o", str(archive))
    assert missing.returncode == 1
    assert missing.stderr == (
        f"systemtap-service: cannot pack tick: no compiled module in {build.cache_dir(FLEET)} "
        f"(run: systemtap-service compile -r {FLEET} tick)\n"
    )
    assert not archive.exists()
    # A second release's cache, as `compile -r` on a fleet's build host would leave it.
    shutil.copytree(build.cache_dir(), build.cache_dir(FLEET))
    record = build.cache_dir(FLEET) / "tick.opts"
    lines = [
        f"release={FLEET}" if line.startswith("release=") else line
        for line in record.read_text().splitlines()
    ]
    record.write_text("\n".join(lines) + "\n")
    packed = build.run("pack", "-r", RELEASE, "-r", FLEET, "-o", str(archive))
    assert packed.returncode == 0, packed.stderr
    assert packed.stdout == f"Packed tick for {RELEASE} {FLEET} into {archive}\n"
    with tarfile.open(archive) as members:
        names = members.getnames()
    assert names[0] == "MANIFEST"
    assert sorted(names[1:]) == sorted(
        [f"cache/{r}/tick.{s}" for r in (RELEASE, FLEET) for s in ("bo", "opts")]
        + ["conf.d/tick.conf"]
    )

    target = compiled.target
    unpacked = target.run("unpack", str(archive))
    assert unpacked.returncode == 0, unpacked.stderr
    assert unpacked.stdout.splitlines()[0] == f"Skipped {FLEET}: not installed on this host"
    assert sorted(p.name for p in target.cache_dir().iterdir()) == ["tick.bo", "tick.opts"]
    assert not target.cache_dir(FLEET).exists()

    # An archive with only releases this host does not run installs nothing.
    only_fleet = compiled.root / "only-fleet.tgz"
    assert build.run("pack", "-r", FLEET, "-o", str(only_fleet)).returncode == 0
    refused = target.run("unpack", "-y", str(only_fleet))
    assert refused.returncode == 1
    assert refused.stderr == (
        f"systemtap-service: {only_fleet}: no release in the archive is for this host "
        f"({FLEET}: not installed on this host); nothing installed\n"
    )


def test_an_archive_built_for_another_architecture_is_refused(
    hosts: Hosts, packed: dict[str, bytes]
) -> None:
    machine = os.uname().machine
    other = "s390x" if machine != "s390x" else "x86_64"
    opts = f"cache/{RELEASE}/tick.opts"
    record = packed[opts].replace(f"machine={machine}\n".encode(), f"machine={other}\n".encode())
    assert record != packed[opts]
    archive = hosts.root / "other-arch.tgz"
    write_tar(archive, listed({**packed, opts: record}))
    refused = hosts.target.run("unpack", "-y", str(archive))
    assert refused.returncode == 1
    assert refused.stderr == (
        f"systemtap-service: {archive}: no release in the archive is for this host "
        f"({RELEASE}: built for {other}, this host is {machine}); nothing installed\n"
    )


@pytest.mark.parametrize("kind", ["FIFO", "device", "directory"])
def test_unpack_of_something_that_is_no_archive_file_does_not_block(
    hosts: Hosts, kind: str
) -> None:
    path = hosts.root / "archive.tgz"
    if kind == "FIFO":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path = Path("/dev/zero")
    done = hosts.target.run("unpack", "-y", str(path), timeout=30)
    assert done.returncode == 1
    assert done.stderr == f"systemtap-service: {path}: not a regular file; nothing installed\n"


@pytest.mark.parametrize("kind", ["symbolic link", "FIFO"])
def test_unpack_never_replaces_what_is_not_a_regular_file(
    hosts: Hosts, packed: dict[str, bytes], kind: str
) -> None:
    archive = hosts.root / "good.tgz"
    write_tar(archive, listed(packed))
    conf = hosts.target.root / "conf.d" / "tick.conf"
    shared = hosts.root / "shared.conf"
    shared.write_text("tick_OPT=--runtime=bpf\n")
    if kind == "FIFO":
        os.mkfifo(conf)
    else:
        conf.symlink_to(shared)
    done = hosts.target.run("unpack", "-y", str(archive), timeout=30)
    assert done.returncode == 1
    assert done.stderr == f"systemtap-service: {archive}: {conf} is a {kind}; nothing installed\n"
    assert shared.read_text() == "tick_OPT=--runtime=bpf\n"
    assert (stat.S_ISFIFO if kind == "FIFO" else stat.S_ISLNK)(conf.lstat().st_mode)
    assert not hosts.target.cache_dir().exists()
