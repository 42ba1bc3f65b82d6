"""The service core in-process, with a fake runtime: PASSALL, requirements, one-shots, orphans."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from stapinit.core.bashvars import Assignment, ConfigError
from stapinit.core.process import Ending
from stapinit.core.runtime import Instance, LoadOptions, LogSink, RuntimeFailure, RuntimeKind, State
from stapinit.initscript import cache, status
from stapinit.initscript.cache import running_kernel
from stapinit.initscript.commands import Initscript, Request
from stapinit.initscript.compiler import wanted_record
from stapinit.initscript.log import Log
from stapinit.initscript.scripts import cache_dir, find_scripts
from stapinit.initscript.settings import Settings, load_settings, settings_from_assignments


class FakeRuntime:
    """Starts nothing; remembers what it was asked and what 'runs'."""

    kind: RuntimeKind = "bpf"

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.launched: list[str] = []
        self.fail: set[str] = set()
        self.one_shot: set[str] = set()

    def launch(self, name: str, module: str, options: LoadOptions, output: int) -> Instance:
        self.launched.append(name)
        return Instance(name, "bpf", os.getpid(), 1, module, "starting")

    def wait_ready(self, instance: Instance, interrupted: Callable[[], bool]) -> Instance:
        if instance.name in self.fail:
            raise RuntimeFailure("stapbpf failed (exit status 1)")
        if instance.name in self.one_shot:
            return instance._replace(phase="exited", exit_status=0)
        self.running.add(instance.name)
        return instance._replace(phase="ready")

    def state(self, name: str, instance: Instance | None) -> State:
        if instance is None:
            return State.STOPPED
        if instance.phase == "exited":
            return State.EXITED
        return State.RUNNING if name in self.running else State.DEAD

    def stop(self, name: str, instance: Instance | None, log: LogSink) -> Ending:
        self.running.discard(name)
        return Ending.TERMINATED


class Rig:
    """Scripts with valid caches in a temporary prefix, run through a fake runtime."""

    def __init__(self, root: Path, **settings: str) -> None:
        self.root = root
        for sub in ("script.d", "conf.d", "cache", "run", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.base = {
            "SCRIPT_PATH": str(root / "script.d"),
            "CONFIG_PATH": str(root / "conf.d"),
            "CACHE_PATH": str(root / "cache"),
            "STAT_PATH": str(root / "run"),
            "TEMP_PATH": str(root / "tmp"),
            "LOG_FILE": str(root / "log"),
            **settings,
        }
        self.per_script: list[Assignment] = []
        self.runtime = FakeRuntime()
        self.out = io.StringIO()
        self.err = io.StringIO()

    def add(self, name: str, requires: str = "") -> None:
        (self.root / "script.d" / f"{name}.stp").write_text("probe begin {}\n")
        self.per_script += [
            Assignment(f"{name}_OPT", "--runtime=bpf", "conf", 1),
            Assignment(f"{name}_REQ", requires, "conf", 2),
        ]

    def settings(self) -> Settings:
        base = [Assignment(k, v, "config", i) for i, (k, v) in enumerate(self.base.items())]
        return settings_from_assignments([*base, *self.per_script])

    def initscript(self, compiled: bool = False) -> Initscript:
        """The service; unless ``compiled`` already, with a valid cache for every script."""
        settings = self.settings()
        kernel = running_kernel()
        directory = cache_dir(settings, kernel.release)
        built = self.root / "built.bo"
        built.write_bytes(b"module")
        for script in [] if compiled else find_scripts(settings, kernel.release, print).values():
            cache.install(directory, script.name, ".bo", built, wanted_record(script, kernel))
        log = Log(None, console=self.err, out=self.out)
        initscript = Initscript(settings, log, lambda _: True)
        initscript.runtimes["bpf"] = self.runtime
        return initscript


def test_levels_start_in_dependency_order_and_report_in_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    for name, requires in (("d", "c b"), ("c", "a"), ("a", ""), ("b", "")):
        rig.add(name, requires)
    assert rig.initscript().start(Request()) == 0
    assert rig.out.getvalue().splitlines() == [f"Started {n} (pid {os.getpid()})" for n in "abcd"]
    assert rig.runtime.launched.index("c") > rig.runtime.launched.index("a")
    assert rig.runtime.launched.index("d") > max(map(rig.runtime.launched.index, "bc"))


def test_a_failed_requirement_blocks_its_dependents_only(tmp_path: Path) -> None:
    rig = Rig(tmp_path, PASSALL="no")
    for name, requires in (("a", ""), ("b", "a"), ("c", "")):
        rig.add(name, requires)
    rig.runtime.fail = {"a"}
    assert rig.initscript().start(Request()) == 0  # PASSALL=no: failures are warnings
    assert rig.runtime.running == {"c"}
    assert "b not started: requirement a failed" in rig.err.getvalue()
    assert not (tmp_path / "run" / "a").exists()  # a failed start leaves no record


def test_passall_stops_at_the_first_failed_level(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    for name, requires in (("a", ""), ("b", ""), ("c", "b")):
        rig.add(name, requires)
    rig.runtime.fail = {"a"}
    assert rig.initscript().start(Request()) == 1
    assert rig.runtime.running == {"b"}  # same level as a: started together
    assert "not started, as PASSALL=yes and a script failed: c" in rig.err.getvalue()


def test_a_one_shot_script_is_a_completed_start(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.add("check")
    rig.runtime.one_shot = {"check"}
    initscript = rig.initscript()
    assert initscript.start(Request()) == 0
    assert "check ran and exited (status 0)" in rig.out.getvalue()
    record = status.read(tmp_path / "run", "check")
    assert record is not None and (record.phase, record.exit_status) == ("exited", 0)
    assert initscript.status(Request(json=True)) == 0
    assert '"exit_status": 0' in rig.out.getvalue()
    assert initscript.stop(Request()) == 0
    assert "check ran and exited; removed its status file" in rig.out.getvalue()


def test_default_start_skips_names_that_are_no_scripts(tmp_path: Path) -> None:
    rig = Rig(tmp_path, DEFAULT_START="a ghost", PASSALL="no")
    rig.add("a")
    assert rig.initscript().start(Request()) == 0
    assert rig.runtime.running == {"a"}
    assert "DEFAULT_START names 'ghost', which is not a script" in rig.err.getvalue()


def test_default_start_naming_a_missing_script_fails_with_passall(tmp_path: Path) -> None:
    rig = Rig(tmp_path, DEFAULT_START="a ghost")
    rig.add("a")
    assert rig.initscript().start(Request()) == 1
    assert rig.runtime.running == {"a"}  # the rest still start


def test_stop_goes_by_records_when_the_script_is_gone(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.add("a")
    initscript = rig.initscript()
    assert initscript.start(Request()) == 0
    (tmp_path / "script.d" / "a.stp").unlink()
    assert initscript.stop(Request()) == 0
    assert rig.runtime.running == set() and not (tmp_path / "run" / "a").exists()


@pytest.mark.parametrize(
    "broken",
    [
        {"b_OPT": "--runtime=bpf -o 'unterminated"},  # a bad quote in another script's options
        {"b_REQ": "no-such"},  # not a script name
        {"b_REQ": "missing"},  # no such script
    ],
)
def test_stop_works_whatever_else_is_broken(tmp_path: Path, broken: dict[str, str]) -> None:
    rig = Rig(tmp_path)
    rig.add("a")
    rig.add("b")
    assert rig.initscript().start(Request()) == 0
    rig.per_script += [Assignment(k, v, "conf", 9) for k, v in broken.items()]
    assert rig.initscript(compiled=True).stop(Request()) == 0
    assert rig.runtime.running == set()


@pytest.mark.parametrize(
    "bad_line",
    ["s2_OPT='--runtime=bpf", "X=$(id)", "if true; then A=1; fi", 'B="unterminated'],
)
def test_shutdown_settings_keep_what_comes_before_a_syntax_error(
    tmp_path: Path, bad_line: str
) -> None:
    config = tmp_path / "config"
    config.write_text(
        f"STAT_PATH={tmp_path}/run\nCONFIG_PATH={tmp_path}/none\n{bad_line}\nLATER=1\n"
    )
    with pytest.raises(ConfigError):
        load_settings(config, environment={})
    warnings: list[str] = []
    settings = load_settings(config, environment={}, on_error=lambda e: warnings.append(str(e)))
    assert settings.stat_path == tmp_path / "run"
    assert warnings and warnings[0].startswith(f"{config}:3:")
