"""``compile`` and ``cleanup`` end to end: the installed command, the real stap."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from stapinit.initscript.cache import CacheRecord
from tests.initscript.conftest import FakeTools
from tests.support.prefix import RELEASE, Prefix

TICK = 'global n\nprobe timer.ms(100) { n++; printf("tick %d\\n", n) }\n'
BROKEN = "probe begin { x = }\n"


def compiled_names(prefix: Prefix, release: str = RELEASE) -> list[str]:
    directory = prefix.cache_dir(release)
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def other_release() -> str:
    """A kernel release with a build tree here, other than the running one."""
    found = sorted(
        entry.name
        for entry in Path("/lib/modules").iterdir()
        if entry.name != RELEASE and (entry / "build" / ".config").exists()
    )
    if not found:
        pytest.skip("no build tree for a kernel other than the running one")
    return found[-1]


def test_compile_all_with_real_stap(bpf_prefix: Prefix) -> None:
    unused = bpf_prefix.root / "log" / "unused"
    bpf_prefix.add_script("alpha", TICK, options=f"--runtime=bpf -o {unused} -DX=1")
    bpf_prefix.add_script("beta", TICK, options="--runtime=bpf")
    done = bpf_prefix.run("compile")
    assert done.returncode == 0, done.stderr
    assert compiled_names(bpf_prefix) == ["alpha.bo", "alpha.opts", "beta.bo", "beta.opts"]
    # Real BPF ELF objects, and the record says what they were built from.
    assert (bpf_prefix.cache_dir() / "alpha.bo").read_bytes()[:4] == b"\x7fELF"
    record = CacheRecord.from_text((bpf_prefix.cache_dir() / "alpha.opts").read_text())
    assert record is not None
    assert (record.runtime, record.options) == ("bpf", ("-D", "X=1"))
    assert record.kernel.release == RELEASE and record.kernel.version == os.uname().version
    log = bpf_prefix.log()
    assert f"Exec: stap -p4 -m alpha -r {RELEASE} --runtime=bpf -D X=1 " in log
    assert f"-o {unused}" not in log
    # Nothing is left behind in TEMP_PATH.
    assert list((bpf_prefix.root / "tmp").iterdir()) == []


def test_existing_caches_are_only_overwritten_when_confirmed(bpf_prefix: Prefix) -> None:
    bpf_prefix.add_script("alpha", TICK, options="--runtime=bpf")
    assert bpf_prefix.run("compile").returncode == 0
    module = bpf_prefix.cache_dir() / "alpha.bo"
    before = module.stat().st_mtime_ns
    refused = bpf_prefix.run("compile")
    assert refused.returncode == 1
    assert str(module) in refused.stdout
    assert "not a terminal; use -y" in refused.stdout
    assert "nothing compiled" in refused.stderr
    assert module.stat().st_mtime_ns == before
    time.sleep(0.01)
    assert bpf_prefix.run("compile", "-y", "alpha").returncode == 0
    assert module.stat().st_mtime_ns > before


def test_exactly_the_stale_caches_are_recompiled(bpf_prefix: Prefix) -> None:
    for name in ("same", "edited", "reopted", "rekerneled"):
        bpf_prefix.add_script(name, TICK, options="--runtime=bpf")
    assert bpf_prefix.run("compile").returncode == 0
    assert {s["cache"] for s in bpf_prefix.status_json().values()} == {"valid"}

    now = time.time()
    for path in [*bpf_prefix.scripts.iterdir(), *bpf_prefix.cache_dir().iterdir()]:
        age = 100 if path.suffix == ".stp" else 50
        os.utime(path, (now - age, now - age))
    (bpf_prefix.scripts / "edited.stp").write_text(TICK + "# edited\n")
    bpf_prefix.configure("reopted", options="--runtime=bpf -DNEW=1")
    record = bpf_prefix.cache_dir() / "rekerneled.opts"
    record.write_text(record.read_text().replace(f"release={RELEASE}", "release=5.10.0-old"))

    states = {name: s["cache"] for name, s in bpf_prefix.status_json().items()}
    assert states == {
        "same": "valid",
        "edited": "stale: script changed",
        "reopted": "stale: options changed",
        "rekerneled": "stale: kernel changed",
    }
    mtimes = {p.name: p.stat().st_mtime_ns for p in bpf_prefix.cache_dir().glob("*.bo")}
    # start compiles what is stale, and only that, before starting anything.
    started = bpf_prefix.run("start")
    try:
        assert started.returncode == 0, started.stderr
        compiled = sorted(
            line.split()[-1] for line in started.stdout.splitlines() if line.startswith("Compiled")
        )
        assert compiled == ["edited", "rekerneled", "reopted"]
        after = {p.name: p.stat().st_mtime_ns for p in bpf_prefix.cache_dir().glob("*.bo")}
        assert after["same.bo"] == mtimes["same.bo"]
        assert after["edited.bo"] != mtimes["edited.bo"]
        assert {s["cache"] for s in bpf_prefix.status_json().values()} == {"valid"}
    finally:
        bpf_prefix.run("stop")


def test_compile_failure_is_one_line_on_console_and_full_in_log(bpf_prefix: Prefix) -> None:
    bpf_prefix.add_script("good", TICK, options="--runtime=bpf")
    bpf_prefix.add_script("bad", BROKEN, options="--runtime=bpf")
    done = bpf_prefix.run("compile")
    assert done.returncode == 1
    failure = [line for line in done.stderr.splitlines() if "Failed to compile bad" in line]
    assert len(failure) == 1 and "parse error" in failure[0]
    assert "compile failed: bad" in done.stderr
    assert compiled_names(bpf_prefix) == ["good.bo", "good.opts"]
    assert "stap output for bad:" in bpf_prefix.log()
    assert "Pass 1: parse failed" in bpf_prefix.log()

    bpf_prefix.write_config(PASSALL="no")
    lenient = bpf_prefix.run("compile", "-y")
    assert lenient.returncode == 0
    assert "warning: compile failed for some scripts: bad" in lenient.stderr


def test_compile_for_another_release(bpf_prefix: Prefix) -> None:
    bpf_prefix.add_script("alpha", TICK, options="--runtime=bpf")
    other = other_release()
    done = bpf_prefix.run("compile", "-r", other)
    assert done.returncode == 0, done.stderr
    assert compiled_names(bpf_prefix, other) == ["alpha.bo", "alpha.opts"]
    record = CacheRecord.from_text((bpf_prefix.cache_dir(other) / "alpha.opts").read_text())
    assert record is not None and record.kernel.release == other and record.kernel.version == ""
    assert not bpf_prefix.cache_dir().exists()


def test_cleanup_lists_asks_and_removes(bpf_prefix: Prefix) -> None:
    bpf_prefix.add_script("alpha", TICK, options="--runtime=bpf")
    bpf_prefix.add_script("beta", TICK, options="--runtime=bpf")
    assert bpf_prefix.run("compile").returncode == 0
    refused = bpf_prefix.run("cleanup")
    assert refused.returncode == 1 and "alpha.bo" in refused.stdout
    assert len(compiled_names(bpf_prefix)) == 4
    assert bpf_prefix.run("cleanup", "-y", "alpha").returncode == 0
    assert compiled_names(bpf_prefix) == ["beta.bo", "beta.opts"]
    assert bpf_prefix.run("cleanup", "-y").returncode == 0
    assert compiled_names(bpf_prefix) == []


def test_kernel_module_compile_command_line(kmod_prefix: Prefix, fake_tools: FakeTools) -> None:
    kmod_prefix.add_script(
        "mod", "probe begin {}\n", options="-v -p2 -m other -s 4 -o /x -c 'ls -l' -x 9 -k -DA=1"
    )
    done = kmod_prefix.run("compile")
    assert done.returncode == 0, done.stderr
    [argv] = fake_tools.calls_of("stap")
    assert argv[:-1] == ["-p4", "-m", "mod", "-r", RELEASE, "-v", "-D", "A=1"]
    # stap compiled a private copy in its own directory of TEMP_PATH, now gone.
    copy = Path(argv[-1])
    assert copy.parent.parent == kmod_prefix.root / "tmp" and copy.name == "mod.stp"
    assert not copy.parent.exists()
    assert compiled_names(kmod_prefix) == ["mod.ko", "mod.opts"]
    built = json.loads((kmod_prefix.cache_dir() / "mod.ko").read_text())
    assert built["script"] == "probe begin {}\n"
    # The log shows the command with the script's own path.
    assert f"-D A=1 {kmod_prefix.scripts / 'mod.stp'}" in kmod_prefix.log()


def test_bad_config_changes_nothing(bpf_prefix: Prefix) -> None:
    bpf_prefix.add_script("alpha", TICK, options="--runtime=bpf")
    conf = bpf_prefix.root / "conf.d" / "zz.conf"
    conf.write_text("OK=1\nrm -rf /\n")
    done = bpf_prefix.run("compile", "-y")
    assert done.returncode == 6
    message = f"{conf}:2: not an assignment: 'rm' (only NAME=value lines are allowed)"
    assert done.stderr.strip() == f"systemtap-service: {message}"
    assert not bpf_prefix.cache_dir().exists()

    conf.write_text("PASSALL=maybe\n")
    done = bpf_prefix.run("compile", "-y")
    assert done.returncode == 6 and "PASSALL='maybe' is not a boolean" in done.stderr


def test_malformed_options_name_the_script(bpf_prefix: Prefix) -> None:
    bpf_prefix.add_script("alpha", TICK)
    (bpf_prefix.root / "conf.d" / "alpha.conf").write_text('alpha_OPT="-o \'unclosed"\n')
    done = bpf_prefix.run("compile")
    assert done.returncode == 6
    assert "alpha_OPT: no closing quotation" in done.stderr
    assert "Traceback" not in done.stderr


def test_invalid_names_are_skipped_and_logged(bpf_prefix: Prefix) -> None:
    bpf_prefix.add_script("alpha", TICK, options="--runtime=bpf")
    (bpf_prefix.scripts / "not-valid.stp").write_text(TICK)
    (bpf_prefix.scripts / "9lives.stp").write_text(TICK)
    assert bpf_prefix.run("compile").returncode == 0
    assert compiled_names(bpf_prefix) == ["alpha.bo", "alpha.opts"]
    done = bpf_prefix.run("compile", "-y")
    assert "warning: not-valid.stp is not a valid script name" in done.stderr
    log = bpf_prefix.log()
    assert "not-valid.stp is not a valid script name" in log
    assert "9lives.stp is not a valid script name" in log


def test_unknown_script_and_usage_errors(bpf_prefix: Prefix) -> None:
    done = bpf_prefix.run("compile", "ghost")
    assert done.returncode == 5 and "no such script: ghost" in done.stderr
    usage = bpf_prefix.run("frobnicate")
    assert usage.returncode == 2 and "usage:" in usage.stderr
    bad_option = bpf_prefix.run("compile", "-Z")
    assert bad_option.returncode == 2 and "unrecognized arguments: -Z" in bad_option.stderr


def test_dependency_errors_exit_6_before_anything_runs(bpf_prefix: Prefix) -> None:
    bpf_prefix.add_script("a", TICK, options="--runtime=bpf", requires="b")
    bpf_prefix.add_script("b", TICK, options="--runtime=bpf", requires="a")
    done = bpf_prefix.run("compile", "-R", "a")
    assert done.returncode == 6
    assert "dependency cycle: a -> b -> a" in done.stderr
    bpf_prefix.configure("b", options="--runtime=bpf", requires="ghost")
    done = bpf_prefix.run("compile", "a")
    assert done.returncode == 6
    assert "b requires ghost, which is not a script" in done.stderr
    assert not bpf_prefix.cache_dir().exists()


def test_missing_log_directory_is_named(bpf_prefix: Prefix, tmp_path: Path) -> None:
    bpf_prefix.add_script("alpha", TICK, options="--runtime=bpf")
    bpf_prefix.write_config(LOG_FILE=str(tmp_path / "nowhere" / "x.log"))
    done = bpf_prefix.run("compile")
    # The log is a convenience: the command does its job and says why it has none.
    assert done.returncode == 0, done.stderr
    assert f"log directory {tmp_path / 'nowhere'} does not exist" in done.stderr
    assert "logging to the console only" in done.stderr


def test_names_and_releases_cannot_reach_outside_the_cache(bpf_prefix: Prefix) -> None:
    victim = bpf_prefix.root / "cache" / "precious.ko"
    victim.write_text("not yours")
    cleanup = bpf_prefix.run("cleanup", "-y", "../precious")
    assert cleanup.returncode == 2 and "'../precious' is not a valid script name" in cleanup.stderr
    traversal = bpf_prefix.run("cleanup", "-y", "-r", "..", "precious")
    assert traversal.returncode == 2 and "'..' is not a kernel release" in traversal.stderr
    assert victim.read_text() == "not yours"


def test_missing_script_path_is_a_configuration_error(bpf_prefix: Prefix, tmp_path: Path) -> None:
    bpf_prefix.write_config(SCRIPT_PATH=str(tmp_path / "typo"))
    for command in ("compile", "start"):
        done = bpf_prefix.run(command)
        assert done.returncode == 6
        assert f"SCRIPT_PATH {tmp_path / 'typo'} does not exist" in done.stderr
    # status (like stop) goes by the status records, and says why.
    status = bpf_prefix.run("status")
    assert status.returncode == 3
    assert f"SCRIPT_PATH {tmp_path / 'typo'} does not exist; going by the status" in status.stderr


def test_junk_in_cache_and_status_dirs_gives_no_traceback(bpf_prefix: Prefix) -> None:
    bpf_prefix.add_script("alpha", TICK, options="--runtime=bpf")
    assert bpf_prefix.run("compile").returncode == 0
    (bpf_prefix.cache_dir() / "alpha.opts").write_bytes(b"release=\xff\xfe\n")
    (bpf_prefix.stat / "alpha").mkdir()
    (bpf_prefix.stat / "notes.txt").write_bytes(b"\xff")
    status = bpf_prefix.run("status", "--json")
    assert status.returncode == 3, status.stderr
    assert bpf_prefix.status_json()["alpha"]["cache"] == "stale: unreadable .opts record"
    bpf_prefix.write_config(CACHE_PATH=str(bpf_prefix.root / "config"))  # a file
    cleanup = bpf_prefix.run("cleanup", "-y")
    assert cleanup.returncode == 0 and "Traceback" not in cleanup.stderr


def test_changing_only_run_time_options_keeps_the_cache(
    kmod_prefix: Prefix, fake_tools: FakeTools
) -> None:
    out = kmod_prefix.root / "log"
    kmod_prefix.add_script("mod", "probe begin {}\n", options=f"-DA=1 -o {out}/a -S 1,2 -s 4 -F")
    assert kmod_prefix.run("compile").returncode == 0
    record = (kmod_prefix.cache_dir() / "mod.opts").read_text()
    kmod_prefix.configure("mod", options=f"-DA=1 -o {out}/b -S 5,9 -s 8 -v -w")
    kmod_prefix.write_config(AUTOCOMPILE="no")
    started = kmod_prefix.run("start")
    assert started.returncode == 0, started.stderr
    assert len(fake_tools.calls_of("stap")) == 1  # no recompile
    assert (kmod_prefix.cache_dir() / "mod.opts").read_text() == record
    [load] = fake_tools.calls_of("staprun")[-1:]
    assert load[:7] == ["-D", "-o", f"{out}/b", "-S", "5,9", "-b", "8"]
    assert kmod_prefix.run("stop").returncode == 0
    # A compile-time option does make the cache stale.
    kmod_prefix.configure("mod", options="-DA=2")
    refused = kmod_prefix.run("start")
    assert refused.returncode == 1 and "no valid cache for mod" in refused.stderr


def test_touching_a_script_keeps_its_cache_and_editing_it_does_not(
    kmod_prefix: Prefix, fake_tools: FakeTools
) -> None:
    script = kmod_prefix.add_script("mod", "probe begin {}\n")
    assert kmod_prefix.run("compile").returncode == 0
    later = time.time() + 100
    os.utime(script, (later, later))
    assert kmod_prefix.status_json()["mod"]["cache"] == "valid"
    # Restored from a backup with an old time stamp: the text decides, not the time.
    script.write_text("probe begin { exit() }\n")
    os.utime(script, (0, 0))
    assert kmod_prefix.status_json()["mod"]["cache"] == "stale: script changed"


def test_names_stap_would_truncate_are_refused_up_front(
    kmod_prefix: Prefix, fake_tools: FakeTools
) -> None:
    longest, too_long = "a" * 55, "b" * 56
    kmod_prefix.add_script(longest, "probe begin {}\n")
    kmod_prefix.add_script(too_long, "probe begin {}\n")
    done = kmod_prefix.run("compile")
    assert done.returncode == 0, done.stderr
    assert (
        f"warning: {too_long}.stp is not a valid script name: it is 56 characters long;"
        " stap truncates module names to 55, so it could never be run"
    ) in done.stderr
    assert compiled_names(kmod_prefix) == [f"{longest}.ko", f"{longest}.opts"]
    assert [argv[2] for argv in fake_tools.calls_of("stap")] == [longest]


def test_a_dangling_script_link_is_reported(kmod_prefix: Prefix) -> None:
    kmod_prefix.add_script("mod", "probe begin {}\n")
    (kmod_prefix.scripts / "gone.stp").symlink_to(kmod_prefix.root / "nowhere.stp")
    (kmod_prefix.scripts / "odd.stp").mkdir()
    done = kmod_prefix.run("compile")
    assert done.returncode == 0, done.stderr
    assert f"warning: {kmod_prefix.scripts}/gone.stp is a dangling symbolic link" in done.stderr
    assert f"warning: {kmod_prefix.scripts}/odd.stp is not a regular file" in done.stderr


def test_refused_options_name_the_script_and_the_reason(kmod_prefix: Prefix) -> None:
    kmod_prefix.add_script("mod", "probe begin {}\n", options="-v -L 'kernel.*'")
    done = kmod_prefix.run("compile")
    assert done.returncode == 6
    assert "mod_OPT: -L cannot be used here: lists probes instead of compiling" in done.stderr
    assert "Traceback" not in done.stderr


def test_junk_named_like_a_cache_is_no_cache_only_script(
    kmod_prefix: Prefix, fake_tools: FakeTools
) -> None:
    kmod_prefix.add_script("mod", "probe begin {}\n")
    assert kmod_prefix.run("compile").returncode == 0
    (kmod_prefix.cache_dir() / "dir.ko").mkdir()
    (kmod_prefix.cache_dir() / "junk.ko").write_text("x")
    kmod_prefix.write_config(ALLOW_CACHEONLY="yes")
    assert sorted(kmod_prefix.status_json()) == ["mod"]


def test_a_nul_byte_in_options_is_a_one_line_error(
    kmod_prefix: Prefix, fake_tools: FakeTools
) -> None:
    kmod_prefix.add_script("mod", "probe begin {}\n")
    conf = kmod_prefix.root / "conf.d" / "mod.conf"
    for value in (b"-I /t\0x", b"-c 'ls\0-l'", b"-o /log/a\0b"):
        conf.write_bytes(b'mod_OPT="' + value + b'"\n')
        for command in ("compile", "start"):
            done = kmod_prefix.run(command)
            assert done.returncode == 6, (value, command)
            assert done.stderr.count("\n") == 1 and "NUL" in done.stderr, (value, command)
    assert fake_tools.calls_of("stap") == [] and fake_tools.calls_of("staprun") == []


def test_cleanup_gets_past_a_directory_named_like_a_cache(
    kmod_prefix: Prefix, fake_tools: FakeTools
) -> None:
    kmod_prefix.add_script("mod", "probe begin {}\n")
    assert kmod_prefix.run("compile").returncode == 0
    (kmod_prefix.cache_dir() / "dir.ko").mkdir()
    (kmod_prefix.cache_dir() / "junk.ko").write_text("x")
    done = kmod_prefix.run("cleanup", "-y")
    assert done.returncode == 0, done.stderr
    assert compiled_names(kmod_prefix) == ["dir.ko"]


def test_a_script_linked_into_script_d_compiles(kmod_prefix: Prefix, tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "linked.stp"
    shared.parent.mkdir()
    shared.write_text("probe begin {}\n")
    (kmod_prefix.scripts / "linked.stp").symlink_to(shared)
    done = kmod_prefix.run("compile")
    assert done.returncode == 0, done.stderr
    assert compiled_names(kmod_prefix) == ["linked.ko", "linked.opts"]
    assert kmod_prefix.status_json()["linked"]["cache"] == "valid"
