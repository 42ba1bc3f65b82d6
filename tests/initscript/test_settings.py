from __future__ import annotations

from pathlib import Path

import pytest

from stapinit.core.bashvars import Assignment, ConfigError
from stapinit.initscript.settings import load_settings, settings_from_assignments


def assign(**values: str) -> list[Assignment]:
    return [Assignment(k, v, "cfg", i + 1) for i, (k, v) in enumerate(values.items())]


def test_defaults_follow_the_spec() -> None:
    s = settings_from_assignments([])
    assert s.script_path == Path("/etc/systemtap/script.d")
    assert s.config_path == Path("/etc/systemtap/conf.d")
    assert s.cache_path == Path("/var/cache/systemtap")
    assert s.temp_path == Path("/tmp")
    assert s.stat_path == Path("/var/run/systemtap")
    assert s.log_file == Path("/var/log/systemtap.log")
    assert (s.passall, s.recursive, s.autocompile, s.allow_cacheonly) == (True, False, True, False)
    assert s.default_start == ()
    assert (s.stap, s.staprun, s.stapbpf) == ("stap", "staprun", "stapbpf")
    assert s.modules_list == Path("/proc/modules")


@pytest.mark.parametrize("word", ["y", "Y", "yes", "Yes", "YES", "1"])
def test_true_spellings(word: str) -> None:
    assert settings_from_assignments(assign(RECURSIVE=word)).recursive is True


@pytest.mark.parametrize("word", ["n", "N", "no", "No", "NO", "0"])
def test_false_spellings(word: str) -> None:
    assert settings_from_assignments(assign(PASSALL=word)).passall is False


def test_bad_boolean_names_key_value_and_place() -> None:
    with pytest.raises(ConfigError, match=r"^cfg:2: AUTOCOMPILE='maybe' is not a boolean"):
        settings_from_assignments(assign(PASSALL="yes", AUTOCOMPILE="maybe"))


def test_relative_path_is_refused() -> None:
    with pytest.raises(ConfigError, match="CACHE_PATH='cache' is not an absolute path"):
        settings_from_assignments(assign(CACHE_PATH="cache"))


def test_trailing_slash_is_normalised() -> None:
    assert settings_from_assignments(assign(SCRIPT_PATH="/var/x/")).script_path == Path("/var/x")


def test_script_parameters_are_collected_last_one_winning() -> None:
    s = settings_from_assignments(
        [
            Assignment("a_OPT", "-v", "one", 1),
            Assignment("a_OPT", "-o x", "two", 5),
            Assignment("a_REQ", "b", "two", 6),
        ]
    )
    opt = s.script_var("a", "OPT")
    assert opt is not None and (opt.value, opt.filename, opt.line) == ("-o x", "two", 5)
    assert s.script_var("b", "OPT") is None


def test_conf_d_files_read_in_name_order_after_global(tmp_path: Path) -> None:
    conf = tmp_path / "conf.d"
    conf.mkdir()
    (tmp_path / "config").write_text(f"CONFIG_PATH={conf}\nBASE=/x\nPASSALL=no\n")
    (conf / "b.conf").write_text("s_OPT=second\nPASSALL=yes\n")
    (conf / "a.conf").write_text('s_OPT="first $BASE"\n')
    (conf / "ignored.txt").write_text("this is not a config file\n")
    s = load_settings(tmp_path / "config", environment={})
    opt = s.script_var("s", "OPT")
    assert opt is not None and opt.value == "second"
    assert s.passall is True
    assert [p.name for p in s.files_read] == ["config", "a.conf", "b.conf"]


def test_missing_named_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_settings(tmp_path / "nope", environment={})


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "1e999", "soon"])
def test_stop_timeout_must_be_positive_and_finite(value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^cfg:1: STOP_TIMEOUT='{value}' is not a"):
        settings_from_assignments([Assignment("STOP_TIMEOUT", value, "cfg", 1)])


def test_timeouts_accept_exponents_and_fractions() -> None:
    settings = settings_from_assignments(
        [
            Assignment("COMPILE_TIMEOUT", "1e3", "cfg", 1),
            Assignment("START_TIMEOUT", "0.5", "cfg", 2),
        ]
    )
    assert (settings.compile_timeout, settings.start_timeout) == (1000.0, 0.5)
