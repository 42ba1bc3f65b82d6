"""Deployment to a host without a compiler (spec §5.7-5.8), with the real stap and stapbpf.

The build host compiles and packs; the target has no ``stap``, no ``.stp``
file, ``AUTOCOMPILE=no`` and ``ALLOW_CACHEONLY=yes``, and gets only the
caches and the conf.d files -- through ``pack``/``unpack`` or plain tar.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.deploy.conftest import TICK, Hosts
from tests.support.prefix import RELEASE, Prefix, wait_for


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def add_tickers(hosts: Hosts) -> dict[str, Path]:
    """``tick`` and ``tock`` (which requires tick) on the build host; their output files."""
    outs = {name: hosts.root / f"{name}.out" for name in ("tick", "tock")}
    hosts.build.add_script("tick", TICK, options=f"--runtime=bpf -o {outs['tick']}")
    hosts.build.add_script(
        "tock", TICK, options=f"--runtime=bpf -o {outs['tock']}", requires="tick"
    )
    return outs


def compile_on_build_host(hosts: Hosts, release: str = RELEASE) -> None:
    done = hosts.build.run("compile", "-r", release, "-y")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == ["Compiled", "Compiled", "tick", "tock"]


def edit_after_compile(prefix: Prefix, name: str) -> None:
    """Change ``name.stp``'s text after it was compiled (its digest decides, not times)."""
    script = prefix.scripts / f"{name}.stp"
    script.write_text(script.read_text() + "# edited\n")


def other_release() -> str:
    """A kernel release with a build tree that is not the running one."""
    for config in sorted(Path("/lib/modules").glob("*/build/.config")):
        release = config.parent.parent.name
        if release != RELEASE:
            return release
    pytest.skip("no second kernel release with a build tree on this machine")


def set_run_time_options(target: Prefix, outs: dict[str, Path]) -> None:
    """The target's admin adds the run-time options an archive never carries, as the README says."""
    local = target.root / "conf.d" / "zz-local.conf"
    local.write_text("".join(f'{name}_OPT="${name}_OPT -o {out}"\n' for name, out in outs.items()))


def start_and_stop_on_target(target: Prefix, outs: dict[str, Path]) -> None:
    """What a user checks on the target: both start in order, run, and stop cleanly."""
    status = target.run("status")
    assert status.returncode == 3
    assert "tick is stopped" in status.stdout and "tock is stopped" in status.stdout
    started = target.run("start")
    assert started.returncode == 0, started.stderr
    assert [line.split()[1] for line in started.stdout.splitlines()] == ["tick", "tock"]
    assert wait_for(lambda: len(lines(outs["tock"])) > 3)
    states = {name: report["state"] for name, report in target.status_json().items()}
    assert states == {"tick": "running", "tock": "running"}
    stopped = target.run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert lines(outs["tick"])[-1] == "end" and lines(outs["tock"])[-1] == "end"
    assert "Compiling" not in target.log()
    assert not list(target.scripts.iterdir())


def test_pack_then_unpack_runs_on_a_target_without_compiler(hosts: Hosts) -> None:
    outs = add_tickers(hosts)
    compile_on_build_host(hosts)
    archive = hosts.root / "stap-scripts.tar.gz"
    # Naming tock brings tick along: the target could not start tock without it.
    packed = hosts.build.run("pack", "-r", RELEASE, "-o", str(archive), "tock")
    assert packed.returncode == 0, packed.stderr
    assert packed.stdout == f"Packed tick tock for {RELEASE} into {archive}\n"
    # The build host's run-time options stay behind, and pack says so.
    assert packed.stderr.splitlines() == [
        f"systemtap-service: warning: {name}: options left out of the archive: "
        f"-o {outs[name]}; set them in the target's own configuration"
        for name in ("tick", "tock")
    ]
    with tarfile.open(archive) as members:
        names = sorted(members.getnames())
    assert names == sorted(
        [
            "MANIFEST",
            f"cache/{RELEASE}/tick.bo",
            f"cache/{RELEASE}/tick.opts",
            f"cache/{RELEASE}/tock.bo",
            f"cache/{RELEASE}/tock.opts",
            "conf.d/tick.conf",
            "conf.d/tock.conf",
        ]
    )

    unpacked = hosts.target.run("unpack", str(archive))
    assert unpacked.returncode == 0, unpacked.stderr
    assert f"Installed {hosts.target.root}/conf.d/tock.conf" in unpacked.stdout
    for name in ("tick.bo", "tick.opts", "tock.bo", "tock.opts"):
        target_file = hosts.target.cache_dir() / name
        assert target_file.read_bytes() == (hosts.build.cache_dir() / name).read_bytes()
    assert (hosts.target.root / "conf.d" / "tock.conf").read_text().splitlines()[1:] == [
        "tock_OPT=--runtime=bpf",
        "tock_REQ=tick",
    ]
    set_run_time_options(hosts.target, outs)
    start_and_stop_on_target(hosts.target, outs)


def test_plain_tar_recipe_of_the_spec_still_works(hosts: Hosts) -> None:
    outs = add_tickers(hosts)
    compile_on_build_host(hosts)
    archive = hosts.root / f"stap-scripts-{RELEASE}.tar.gz"
    build, target = hosts.build.root, hosts.target.root
    caches = ["-C", str(build / "cache"), RELEASE]
    confs = ["-C", str(build / "conf.d"), "tick.conf", "tock.conf"]
    subprocess.run(["tar", "czf", str(archive), *caches, *confs], check=True)
    subprocess.run(["tar", "xzf", str(archive), "-C", str(target / "cache")], check=True)
    for conf in ("tick.conf", "tock.conf"):
        (target / "cache" / conf).rename(target / "conf.d" / conf)
    start_and_stop_on_target(hosts.target, outs)


def test_compile_for_a_kernel_that_is_not_running_then_deploy(hosts: Hosts) -> None:
    release = other_release()
    add_tickers(hosts)
    archive = hosts.root / f"stap-scripts-{release}.tar.gz"
    refused = hosts.build.run("pack", "-r", release, "-o", str(archive))
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"systemtap-service: cannot pack tick: no compiled module in "
        f"{hosts.build.cache_dir(release)} (run: systemtap-service compile -r {release} tick)"
    ]
    assert not archive.exists()

    compile_on_build_host(hosts, release)
    record = (hosts.build.cache_dir(release) / "tick.opts").read_text()
    assert f"release={release}\n" in record and "version=\n" in record
    packed = hosts.build.run("pack", "-r", release, "-o", str(archive))
    assert packed.returncode == 0, packed.stderr
    unpacked = hosts.target.run("unpack", str(archive))
    assert unpacked.returncode == 0, unpacked.stderr
    assert (hosts.target.cache_dir(release) / "tick.opts").read_text() == record
    assert sorted(p.name for p in hosts.target.cache_dir(release).iterdir()) == [
        "tick.bo",
        "tick.opts",
        "tock.bo",
        "tock.opts",
    ]
    assert not hosts.target.cache_dir().exists()


def test_pack_refuses_a_stale_cache_and_options_an_archive_may_not_carry(hosts: Hosts) -> None:
    add_tickers(hosts)
    compile_on_build_host(hosts)
    archive = hosts.root / "out.tar.gz"
    edit_after_compile(hosts.build, "tock")
    stale = hosts.build.run("pack", "-o", str(archive))
    assert stale.returncode == 1
    assert stale.stderr.startswith("systemtap-service: cannot pack tock: script changed")
    assert not archive.exists()

    # -I names a directory on the target: it stays in each host's own configuration.
    tapsets = hosts.root / "tapsets"
    tapsets.mkdir()
    hosts.build.configure("tick", f"--runtime=bpf -I {tapsets}")
    compile_on_build_host(hosts)
    refused = hosts.build.run("pack", "-o", str(archive))
    assert refused.returncode == 1
    assert refused.stderr == (
        f"systemtap-service: cannot pack tick: tick_OPT: -I {tapsets} is not one of the "
        "compile options an archive may set\n"
    )
    assert not archive.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pack"], "pack needs -o FILE"),
        (["start", "-o", "x.tar.gz"], "-o is not valid with start"),
        (["unpack"], "unpack takes exactly one archive file"),
        (["unpack", "a.tgz", "b.tgz"], "unpack takes exactly one archive file"),
        (["compile", "--all-kernels", "-r", RELEASE], "--all-kernels and -r exclude each other"),
        (["status", "--all-kernels"], "--all-kernels is not valid with status"),
        (["unpack", "-r", RELEASE, "a.tgz"], "-r is not valid with unpack"),
        (
            ["compile", "-r", RELEASE, "-r", RELEASE],
            "-r may be given more than once only with pack",
        ),
        (["pack", "-r", RELEASE, "-r", "../x", "-o", "a.tgz"], "'../x' is not a kernel release"),
    ],
)
def test_usage_errors(hosts: Hosts, args: list[str], message: str) -> None:
    done = hosts.build.run(*args)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == f"systemtap-service: {message}" or (
        message in done.stderr.splitlines()[0]
    )
    assert "Traceback" not in done.stderr


def test_unpack_asks_before_replacing_different_files(hosts: Hosts) -> None:
    add_tickers(hosts)
    compile_on_build_host(hosts)
    archive = hosts.root / "out.tar.gz"
    assert hosts.build.run("pack", "-o", str(archive)).returncode == 0
    mine = hosts.target.root / "conf.d" / "tick.conf"
    mine.write_text("tick_OPT='--runtime=bpf'\n")

    refused = hosts.target.run("unpack", str(archive))
    assert refused.returncode == 1
    assert f"  {mine}" in refused.stdout
    assert refused.stderr == "systemtap-service: not replacing existing files; nothing installed\n"
    assert mine.read_text() == "tick_OPT='--runtime=bpf'\n"
    assert not hosts.target.cache_dir().exists()

    replaced = hosts.target.run("unpack", "-y", str(archive))
    assert replaced.returncode == 0, replaced.stderr
    assert mine.read_text().splitlines()[1:] == ["tick_OPT=--runtime=bpf", "tick_REQ=''"]


def test_compile_all_kernels_compiles_each_release_once(hosts: Hosts) -> None:
    releases = sorted(p.parent.parent.name for p in Path("/lib/modules").glob("*/build/.config"))
    assert RELEASE in releases  # dev/setup-host gives the running kernel a build tree
    add_tickers(hosts)
    first = hosts.build.run("compile", "--all-kernels")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("Compiled tick") == len(releases)
    for release in releases:
        record = (hosts.build.cache_dir(release) / "tock.opts").read_text()
        assert f"release={release}\n" in record
    modules = sorted(hosts.build.root.glob("cache/*/*.bo"))
    assert len(modules) == 2 * len(releases)
    mtimes = [path.stat().st_mtime_ns for path in modules]

    again = hosts.build.run("compile", "--all-kernels")
    assert again.returncode == 0, again.stderr
    assert "Compiled" not in again.stdout
    for release in releases:
        assert f"tick is up to date for {release}" in again.stdout
    assert [path.stat().st_mtime_ns for path in modules] == mtimes

    edit_after_compile(hosts.build, "tock")
    changed = hosts.build.run("compile", "--all-kernels", "tock")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.count("Compiled tock") == len(releases)
    assert "tick" not in changed.stdout


def test_unpack_that_cannot_write_everything_writes_nothing(hosts: Hosts) -> None:
    add_tickers(hosts)
    compile_on_build_host(hosts)
    archive = hosts.root / "out.tar.gz"
    assert hosts.build.run("pack", "-o", str(archive)).returncode == 0
    conf_d = hosts.target.root / "conf.d"

    # The conf.d files can be staged, but CACHE_PATH cannot hold a directory.
    blocked = hosts.root / "not-a-directory"
    blocked.write_text("")
    hosts.target.write_config(CACHE_PATH=str(blocked))
    failed = hosts.target.run("unpack", str(archive))
    assert failed.returncode == 1
    assert failed.stderr.startswith(f"systemtap-service: {archive}: cannot write ")
    assert failed.stderr.endswith("; nothing installed\n")
    assert list(conf_d.iterdir()) == []  # no staged temp file left behind

    hosts.target.write_config(CACHE_PATH=str(hosts.target.root / "cache"))
    (conf_d / "tick.conf").mkdir()
    in_the_way = hosts.target.run("unpack", "-y", str(archive))
    assert in_the_way.returncode == 1
    assert in_the_way.stderr == (
        f"systemtap-service: {archive}: {conf_d / 'tick.conf'} is a directory; nothing installed\n"
    )
    assert [p.name for p in conf_d.iterdir()] == ["tick.conf"]
    assert not hosts.target.cache_dir().exists()
