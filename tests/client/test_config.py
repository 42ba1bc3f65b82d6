"""client.conf: the system-wide file, then the user's."""

from __future__ import annotations

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
    config = read_client_config(StorePaths.default({"STAP_TRUST_ROOT": str(root)}, home), 9740)
    assert config == ClientConfig(
        servers=(ServerAddress("a", 1), ServerAddress("2001:db8::1", 9740)),
        runtime="bpf",
        loader_socket=Path("/tmp/l.sock"),
        stapbpf="/opt/stapbpf",
        staprun="staprun",
    )


def test_no_files_means_defaults(tmp_path: Path) -> None:
    paths = StorePaths.default({"STAP_TRUST_ROOT": str(tmp_path)}, home=tmp_path)
    assert read_client_config(paths, 9740) == ClientConfig()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[client]\nserver = a\n", "f.conf: unknown setting\\(s\\) server"),
        ("[client]\nservers = a:b\n", "f.conf: invalid port"),
        ("[client]\nruntime = dyninst\n", "f.conf: runtime must be bpf or kmod"),
        ("servers = a\n", "f.conf: File contains no section headers"),
    ],
)
def test_bad_settings_name_the_file(text: str, match: str) -> None:
    with pytest.raises(ClientConfigError, match=match):
        apply_config_text(ClientConfig(), text, "f.conf", 9740)
