"""stap-loader's configuration file and tool lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from stapinit.loader.config import (
    DEFAULT_SOCKET,
    ConfigError,
    parse_config,
    read_config,
    resolve_tool,
)
from stapinit.trust.stores import StorePaths

PATHS = StorePaths.default({"STAP_TRUST_ROOT": "/srv/root"})


def test_defaults_without_a_file() -> None:
    config = read_config(None, StorePaths.default({"STAP_TRUST_ROOT": "/nonexistent"}))
    assert config.socket_path == DEFAULT_SOCKET == Path("/run/stap-loader.sock")
    assert (config.stapbpf, config.staprun) == ("stapbpf", "staprun")
    assert config.signer_store == Path("/nonexistent/etc/systemtap/staprun")
    assert (config.max_sessions, config.max_sessions_per_user) == (16, 4)


def test_settings_are_read() -> None:
    config = parse_config(
        "[loader]\nsocket = /tmp/l.sock\nstapbpf = /opt/stapbpf\nsigner_store = /s\n"
        "stop_timeout = 1.5\nmax_sessions = 3\nmax_sessions_per_user = 1\nio_timeout = 2.5\n",
        "test.conf",
        PATHS,
    )
    assert config.socket_path == Path("/tmp/l.sock")
    assert config.stapbpf == "/opt/stapbpf" and config.staprun == "staprun"
    assert config.signer_store == Path("/s")
    assert (config.stop_timeout, config.max_sessions, config.max_sessions_per_user) == (1.5, 3, 1)
    assert config.io_timeout == 2.5


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[loader]\nstapbfp = x\n", "test.conf: unknown setting\\(s\\) stapbfp"),
        ("[loader]\nmax_sessions = many\n", "test.conf: invalid literal"),
        ("[loader]\nstop_timeout = 0\n", "must be positive"),
        ("[loader]\nio_timeout = -1\n", "must be positive"),
        ("[loader]\nio_timeout = nan\n", "must be positive"),
        ("[loader]\nio_timeout = inf\n", "must be positive"),
        ("[loader]\nmax_sessions = 0\n", "must be positive"),
        ("[loader]\nsocket = a\nsocket = b\n", "test.conf: While reading"),
        ("socket = a\n", "test.conf: File contains no section headers"),
    ],
)
def test_bad_files_name_themselves(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(text, "test.conf", PATHS)


def test_an_explicit_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        read_config(tmp_path / "missing.conf", PATHS)


def test_tools_are_found_in_the_system_path_only(tmp_path: Path) -> None:
    assert resolve_tool("sh") in ("/usr/bin/sh", "/bin/sh", "/usr/local/bin/sh")
    assert resolve_tool("/opt/x/stapbpf") == "/opt/x/stapbpf"
    with pytest.raises(ConfigError, match="must be absolute"):
        resolve_tool("./stapbpf")
    with pytest.raises(ConfigError, match="not found in /usr/local/sbin"):
        resolve_tool("no-such-tool-anywhere")


def test_the_example_file_gives_the_defaults() -> None:
    example = Path(__file__).parents[2] / "data/loader/stap-loader.conf"
    assert parse_config(example.read_text(), str(example), PATHS) == read_config(
        None, StorePaths.default({"STAP_TRUST_ROOT": "/srv/root"})
    )
