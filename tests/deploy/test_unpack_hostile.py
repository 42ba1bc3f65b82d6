"""unpack treats an archive as hostile: anything off is refused and nothing is written."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy.conftest import Entry, Hosts, listed, manifest, regular, special, write_tar
from tests.support.prefix import RELEASE

BO = f"cache/{RELEASE}/tick.bo"
OPTS = f"cache/{RELEASE}/tick.opts"


def with_extra(name: str) -> Callable[[dict[str, bytes], Path], list[Entry]]:
    def build(files: dict[str, bytes], root: Path) -> list[Entry]:
        return listed({**files, name.format(root=root): b"tick_OPT=--runtime=bpf\n"})

    return build


def symlinked_module(files: dict[str, bytes], root: Path) -> list[Entry]:
    others = [regular(path, data) for path, data in files.items() if path != BO]
    return [manifest(files), *others, special(BO, tarfile.SYMTYPE, "/etc/passwd")]


def extra_special(kind: bytes, linkname: str) -> Callable[[dict[str, bytes], Path], list[Entry]]:
    def build(files: dict[str, bytes], root: Path) -> list[Entry]:
        return [*listed(files), special("conf.d/link.conf", kind, linkname)]

    return build


def bad_checksum(files: dict[str, bytes], root: Path) -> list[Entry]:
    changed = {**files, BO: files[BO][:-1] + bytes([files[BO][-1] ^ 1])}
    return [manifest(files)] + [regular(path, data) for path, data in changed.items()]


def unlisted(files: dict[str, bytes], root: Path) -> list[Entry]:
    return [*listed(files), regular("conf.d/extra.conf", b"x_OPT=-v\n")]


def missing(files: dict[str, bytes], root: Path) -> list[Entry]:
    entries = listed({**files, "conf.d/gone.conf": b"x_OPT=-v\n"})
    return [entry for entry in entries if entry[0].name != "conf.d/gone.conf"]


def no_manifest(files: dict[str, bytes], root: Path) -> list[Entry]:
    return listed(files)[1:]


def duplicate(files: dict[str, bytes], root: Path) -> list[Entry]:
    return [*listed(files), regular(BO, b"\x7fELF other")]


def record_without_module(files: dict[str, bytes], root: Path) -> list[Entry]:
    return listed({path: data for path, data in files.items() if path != BO})


def module_without_record(files: dict[str, bytes], root: Path) -> list[Entry]:
    return listed({path: data for path, data in files.items() if path != OPTS})


def record_for_other_release(files: dict[str, bytes], root: Path) -> list[Entry]:
    record = files[OPTS].replace(f"release={RELEASE}\n".encode(), b"release=1.2.3-other\n")
    return listed({**files, OPTS: record})


def directory(files: dict[str, bytes], root: Path) -> list[Entry]:
    return [special(f"cache/{RELEASE}", tarfile.DIRTYPE), *listed(files)]


def with_conf(text: str, name: str = "tick") -> Callable[[dict[str, bytes], Path], list[Entry]]:
    """The packed files with ``conf.d/NAME.conf`` holding ``text``, listed in the manifest."""

    def build(files: dict[str, bytes], root: Path) -> list[Entry]:
        return listed({**files, f"conf.d/{name}.conf": text.format(root=root).encode()})

    return build


# conf.d/tick.conf files an archive may not carry: what they say, and the error's tail.
HOSTILE_CONF = {
    "command substitution": (
        "tick_OPT=--runtime=bpf\nc_OPT=`reboot`\n",
        "conf.d/tick.conf:2: an archive's settings must be literal (no $ or `)",
    ),
    "variable expansion": (
        'tick_OPT="--runtime=bpf $EXTRA"\n',
        "conf.d/tick.conf:1: an archive's settings must be literal (no $ or `)",
    ),
    "tool path": (
        "tick_REQ=\nSTAPBPF={root}/evil\n",
        "conf.d/tick.conf:2: STAPBPF is not tick_OPT or tick_REQ",
    ),
    "global parameter": (
        "# quiet\nexport PASSALL=no\n",
        "conf.d/tick.conf:2: PASSALL is not tick_OPT or tick_REQ",
    ),
    "another script's options": (
        "other_OPT=-g\n",
        "conf.d/tick.conf:1: other_OPT is not tick_OPT or tick_REQ",
    ),
    "another per-script suffix": (
        "tick_ENV=x\n",
        "conf.d/tick.conf:1: tick_ENV is not tick_OPT or tick_REQ",
    ),
    "command run at start (-c)": (
        "tick_OPT='--runtime=bpf -c reboot'\n",
        "conf.d/tick.conf:1: tick_OPT: -c reboot is a run-time option; "
        "only the target's own configuration sets those",
    ),
    "output file (-o)": (
        "tick_OPT='--runtime=bpf -o/etc/shadow'\n",
        "conf.d/tick.conf:1: tick_OPT: -o /etc/shadow is a run-time option; "
        "only the target's own configuration sets those",
    ),
    "tapset directory (-I)": (
        "tick_OPT='--runtime=bpf -I /tmp'\n",
        "conf.d/tick.conf:1: tick_OPT: -I /tmp is not one of the compile options "
        "an archive may set",
    ),
    "kbuild make option (-B)": (
        "tick_OPT='-B CC=/tmp/evil'\n",
        "conf.d/tick.conf:1: tick_OPT: -B CC=/tmp/evil is not one of the compile options "
        "an archive may set",
    ),
    "remote host (--remote)": (
        "tick_OPT='--runtime=bpf --remote=evil.example'\n",
        "conf.d/tick.conf:1: tick_OPT: --remote=evil.example cannot be used here: "
        "runs the script on another host",
    ),
    "macro with shell syntax (-D)": (
        "tick_OPT='--runtime=bpf -DX=\\;reboot'\n",
        "conf.d/tick.conf:1: tick_OPT: -D X=;reboot: an archive may give this option only a value",
    ),
    "requirement that is not a name": (
        "tick_REQ='../x'\n",
        "conf.d/tick.conf:1: tick_REQ: '../x' is not a script name",
    ),
    # Either would keep every boot script of the target from starting.
    "requirement the archive does not carry": (
        "tick_REQ=ghost\n",
        "conf.d/tick.conf:1: tick_REQ: ghost is not a script the archive carries",
    ),
    "requirement on itself (a cycle)": (
        "tick_REQ=tick\n",
        "the archive's conf.d files: dependency cycle: tick -> tick",
    ),
}

HOSTILE = {
    "parent directory": with_extra("../evil.conf"),
    "parent inside a path": with_extra("conf.d/../../evil.conf"),
    "absolute path": with_extra("{root}/evil.conf"),
    "another directory": with_extra("etc/evil.conf"),
    "another release": with_extra("cache/1.2.3-other/tick.bo"),
    "dot component": with_extra("conf.d/./dot.conf"),
    "symlink as module": symlinked_module,
    "symlink pointing out": extra_special(tarfile.SYMTYPE, "../../../../etc/shadow"),
    "hard link": extra_special(tarfile.LNKTYPE, "/etc/passwd"),
    "fifo": extra_special(tarfile.FIFOTYPE, ""),
    "directory member": directory,
    "checksum mismatch": bad_checksum,
    "file not in manifest": unlisted,
    "manifest lists a missing file": missing,
    "no manifest": no_manifest,
    "member given twice": duplicate,
    "record without module": record_without_module,
    "module without record": module_without_record,
    "record for another release": record_for_other_release,
    **{f"conf.d file with a {case}": with_conf(text) for case, (text, _) in HOSTILE_CONF.items()},
    "conf.d file of a script not in the archive": with_conf("other_OPT=-v\n", "other"),
    "conf.d file of another name": with_conf("tick_OPT=--runtime=bpf\n", "zz"),
}


def snapshot(root: Path, log_file: Path) -> dict[str, bytes]:
    """Every path under ``root`` with its contents (but the log, where errors go, and the lock)."""
    found: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        if path == log_file or path.suffix == ".gz" or path.name == ".lock":
            continue
        key = str(path.relative_to(root))
        found[key] = path.read_bytes() if path.is_file() and not path.is_symlink() else b"<dir>"
    return found


def test_a_well_formed_archive_written_the_same_way_is_accepted(
    hosts: Hosts, packed: dict[str, bytes]
) -> None:
    archive = hosts.root / "control.tar.gz"
    write_tar(archive, listed(packed))
    done = hosts.target.run("unpack", str(archive))
    assert done.returncode == 0, done.stderr
    assert (hosts.target.cache_dir() / "tick.bo").read_bytes() == packed[BO]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_with_nothing_written(
    hosts: Hosts, packed: dict[str, bytes], case: str
) -> None:
    archive = hosts.root / "hostile.tar.gz"
    write_tar(archive, HOSTILE[case](packed, hosts.root))
    before = snapshot(hosts.root, hosts.target.log_file)
    done = hosts.target.run("unpack", "-y", str(archive))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"systemtap-service: {archive}: ")
    assert done.stderr.endswith("; nothing installed\n")
    assert snapshot(hosts.root, hosts.target.log_file) == before
    assert not (hosts.target.root / "conf.d" / "evil.conf").exists()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"this is not a tar archive\n" * 10, "not a readable tar.gz archive"),
        (None, "no such file"),
    ],
)
def test_unreadable_archive_is_refused(hosts: Hosts, content: bytes | None, why: str) -> None:
    archive = hosts.root / "broken.tar.gz"
    if content is not None:
        archive.write_bytes(content)
    done = hosts.target.run("unpack", str(archive))
    assert done.returncode == 1
    assert done.stderr.startswith(f"systemtap-service: {archive}: {why}")
    assert len(done.stderr.splitlines()) == 1
    assert not list((hosts.target.root / "cache").iterdir())


@pytest.mark.parametrize("case", sorted(HOSTILE_CONF))
def test_conf_file_setting_more_than_the_scripts_options_is_refused(
    hosts: Hosts, packed: dict[str, bytes], case: str
) -> None:
    text, why = HOSTILE_CONF[case]
    archive = hosts.root / "hostile.tar.gz"
    write_tar(archive, with_conf(text)(packed, hosts.root))
    done = hosts.target.run("unpack", "-y", str(archive))
    assert done.returncode == 1
    assert done.stderr.startswith(f"systemtap-service: {archive}: {why}"), done.stderr
    assert done.stderr.endswith("; nothing installed\n")
    assert not (hosts.target.root / "conf.d" / "tick.conf").exists()
    assert not hosts.target.cache_dir().exists()
    # The target still works: nothing it reads was changed.
    assert hosts.target.run("status").returncode == 3


def test_conf_file_with_options_and_requirements_of_carried_scripts_is_accepted(
    hosts: Hosts, packed: dict[str, bytes]
) -> None:
    archive = hosts.root / "options.tar.gz"
    conf = "# tick's settings\nexport tick_OPT='--runtime=bpf -DMAXACTION=5000 -g'\ntick_REQ=\"\"\n"
    write_tar(archive, with_conf(conf)(packed, hosts.root))
    done = hosts.target.run("unpack", "-y", str(archive))
    assert done.returncode == 0, done.stderr
    assert (hosts.target.root / "conf.d" / "tick.conf").read_text() == conf
