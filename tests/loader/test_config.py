"""stap-loader's configuration file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stapinit.core.errors import ConfigFileError
from stapinit.loader.config import parse_config, read_config
from stapinit.loader_wire import DEFAULT_SOCKET
from stapinit.trust.stores import StorePaths
from tests.trust.people import User, ensure_users, shared_tmpdir

PATHS = StorePaths.default({"STAP_TRUST_ROOT": "/srv/root"})


def test_defaults_without_a_file() -> None:
    config = read_config(None, StorePaths.default({"STAP_TRUST_ROOT": "/nonexistent"}))
    assert config.socket_path == DEFAULT_SOCKET == Path("/run/stap-loader.sock")
    assert (config.stapbpf, config.staprun) == ("stapbpf", "staprun")
    assert config.signer_store == Path("/nonexistent/etc/systemtap/staprun")
    assert (config.max_sessions, config.max_sessions_per_user) == (16, 4)
    assert config.spool_limit == 512 << 20


def test_settings_are_read() -> None:
    config = parse_config(
        "[loader]\nsocket = /tmp/l.sock\nstapbpf = /opt/stapbpf\nsigner_store = /s\n"
        "stop_timeout = 1.5\nmax_sessions = 3\nmax_sessions_per_user = 1\nio_timeout = 2.5\n"
        "spool_limit = 64M\n",
        "test.conf",
        PATHS,
    )
    assert config.socket_path == Path("/tmp/l.sock")
    assert config.stapbpf == "/opt/stapbpf" and config.staprun == "staprun"
    assert config.signer_store == Path("/s")
    assert (config.stop_timeout, config.max_sessions, config.max_sessions_per_user) == (1.5, 3, 1)
    assert config.io_timeout == 2.5
    assert config.spool_limit == 64 << 20


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[loader]\nstapbfp = x\n", "test.conf: unknown setting(s) stapbfp"),
        ("[loader]\n\nmax_sessions = many\n", "test.conf:3: max_sessions: 'many' is not"),
        ("[loader]\nstop_timeout = 0\n", "test.conf:2: stop_timeout: '0' is not a positive"),
        ("[loader]\nio_timeout = -1\n", "test.conf:2: io_timeout: '-1' is not a positive"),
        ("[loader]\nio_timeout = nan\n", "test.conf:2: io_timeout: 'nan' is not a positive"),
        ("# x\n[loader]\nio_timeout = inf\n", "test.conf:3: io_timeout: 'inf' is not a positive"),
        ("[loader]\nmax_sessions = 0\n", "test.conf:2: max_sessions: '0' is not from 1"),
        ("[loader]\nmax_sessions = " + "9" * 5000 + "\n", "test.conf:2: max_sessions:"),
        ("[loader]\nspool_limit = 1T\n", "test.conf:2: spool_limit: '1T' is not a size"),
        ("[loader]\nstapbpf = bin/stapbpf\n", "test.conf:2: stapbpf: 'bin/stapbpf' is neither"),
        ("[loader]\nsocket = run/l.sock\n", "test.conf:2: socket: 'run/l.sock' is not an abs"),
        ("[loader]\nsocket = /a\nsocket = /b\n", "test.conf: While reading"),
        ("socket = a\n", "test.conf: File contains no section headers"),
    ],
)
def test_bad_files_name_the_file_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigFileError) as info:
        parse_config(text, "test.conf", PATHS)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 6


def test_an_explicit_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"missing\.conf: no such configuration file"):
        read_config(tmp_path / "missing.conf", PATHS)


@pytest.fixture(scope="module")
def users() -> dict[str, User]:
    return ensure_users()


def test_a_file_others_could_change_is_refused(users: dict[str, User]) -> None:
    # The loader runs as root: whoever may edit its file chooses what root runs.
    base = shared_tmpdir("sttest-loaderconf-")
    try:
        conf = base / "stap-loader.conf"
        conf.write_text("[loader]\nstapbpf = /tmp/evil\n")
        assert read_config(conf, PATHS).stapbpf == "/tmp/evil"  # root's own: fine
        plain = users["sttest_plain"]
        os.chown(conf, plain.uid, plain.gid)
        with pytest.raises(ConfigFileError, match=f"is owned by uid {plain.uid}, not root"):
            read_config(conf, PATHS)
        os.chown(conf, 0, 0)
        conf.chmod(0o666)
        with pytest.raises(ConfigFileError, match=r"is writable by others \(mode 0666\)"):
            read_config(conf, PATHS)
        conf.chmod(0o644)
        os.chown(base, plain.uid, plain.gid)  # the user could rename the file away
        with pytest.raises(ConfigFileError, match=f"{base} is owned by uid {plain.uid}"):
            read_config(conf, PATHS)
    finally:
        os.chown(base, 0, 0)
        conf.unlink()
        base.rmdir()


def test_the_example_file_gives_the_defaults() -> None:
    example = Path(__file__).parents[2] / "data/loader/stap-loader.conf"
    assert parse_config(example.read_text(), str(example), PATHS) == read_config(
        None, StorePaths.default({"STAP_TRUST_ROOT": "/srv/root"})
    )
