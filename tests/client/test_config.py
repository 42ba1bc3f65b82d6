"""client.conf: the system-wide file, then the user's."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from stapinit.client.config import (
    ClientConfig,
    ClientConfigError,
    apply_config_text,
    config_files,
    read_client_config,
)
from stapinit.trust.address import ServerAddress
from stapinit.trust.stores import StorePaths


def test_files_read_in_order(tmp_path: Path) -> None:
    paths = StorePaths.default({"STAP_TRUST_ROOT": str(tmp_path)}, home=Path("/home/u"))
    assert config_files(paths) == [
        tmp_path / "etc/systemtap/client.conf",
        Path("/home/u/.systemtap/client.conf"),
    ]


def test_the_example_file_parses() -> None:
    example = Path(__file__).parents[2] / "data/client/client.conf"
    config = apply_config_text(ClientConfig(), example.read_text(), str(example), 9740)
    assert config.loader_socket == Path("/run/stap-loader.sock")


def test_user_settings_override_system_ones(tmp_path: Path) -> None:
    root, home = tmp_path / "root", tmp_path / "home"
    (root / "etc/systemtap").mkdir(parents=True)
    (home / ".systemtap").mkdir(parents=True)
    (root / "etc/systemtap/client.conf").write_text(
        "[client]\nservers = a:1 [2001:db8::1]\nruntime = kmod\nstapbpf = /opt/stapbpf\n"
    )
    (home / ".systemtap/client.conf").write_text(
        "[client]\nruntime = bpf  # this host\nloader_socket = /tmp/l.sock\n"
    )
    config = read_client_config(
        StorePaths.default({"STAP_TRUST_ROOT": str(root)}, home), 9740, True, print
    )
    assert config == ClientConfig(
        servers=(ServerAddress("a", 1), ServerAddress("2001:db8::1", 9740)),
        runtime="bpf",
        loader_socket=Path("/tmp/l.sock"),
        stapbpf="/opt/stapbpf",
        staprun="staprun",
    )


def test_no_files_means_defaults(tmp_path: Path) -> None:
    paths = StorePaths.default({"STAP_TRUST_ROOT": str(tmp_path)}, home=tmp_path)
    assert read_client_config(paths, 9740, True, print) == ClientConfig()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[client]\nserver = a\n", "f.conf: unknown setting\\(s\\) server"),
        ("[client]\nservers = a:b\n", "f.conf:2: invalid port"),
        ("[client]\nruntime = dyninst\n", "f.conf:2: runtime must be bpf or kmod"),
        ("servers = a\n", "f.conf: File contains no section headers"),
    ],
)
def test_bad_settings_name_the_file(text: str, match: str) -> None:
    with pytest.raises(ClientConfigError, match=match):
        apply_config_text(ClientConfig(), text, "f.conf", 9740)


def read_in_time(paths: StorePaths) -> ClientConfig | Exception:
    """``read_client_config`` run in a thread: what it returned or raised within 5 s."""
    outcome: list[ClientConfig | Exception] = []

    def read() -> None:
        try:
            outcome.append(read_client_config(paths, 9740, False, print))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(5)
    assert outcome, "reading the configuration hung"
    return outcome[0]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: os.mkfifo(path), "client.conf: is not a regular file"),
        (lambda path: path.mkdir(), "client.conf: is not a regular file"),
        (lambda path: path.symlink_to("/dev/zero"), "client.conf: is a symbolic link"),
        (lambda path: path.write_bytes(b"#" * (2 << 20)), "client.conf: is larger than 1048576"),
        (lambda path: path.write_bytes(b"[client]\n\xff\n"), "client.conf: not UTF-8 text"),
        (
            lambda path: path.write_text("[client]\nservers = a:" + "9" * 5000 + "\n"),
            "client.conf:2: invalid port in server address",
        ),
    ],
)
def test_odd_files_are_one_line_errors_not_hangs(
    tmp_path: Path, make: Callable[[Path], object], message: str
) -> None:
    (tmp_path / ".systemtap").mkdir()
    make(tmp_path / ".systemtap" / "client.conf")
    paths = StorePaths.default({"STAP_TRUST_ROOT": str(tmp_path / "none")}, home=tmp_path)
    outcome = read_in_time(paths)
    assert isinstance(outcome, ClientConfigError)
    assert str(outcome).startswith(str(tmp_path / ".systemtap" / message.split(":")[0]))
    assert message.split(": ", 1)[1] in str(outcome)
