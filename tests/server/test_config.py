"""The server's configuration file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stapinit.core.errors import ConfigFileError
from stapinit.core.lsb import EXIT_NOT_CONFIGURED
from stapinit.server.config import ServerConfig, load_config, parse_config

DATA = Path(__file__).resolve().parents[2] / "data" / "server" / "stap-server.conf"


def test_packaged_config_documents_the_defaults() -> None:
    assert load_config(DATA) == ServerConfig()


def test_values_are_parsed() -> None:
    config = parse_config(
        "PORT=1234\nLISTEN_ADDRESS=::1\nSTATE_DIR=/srv/st\nRELEASES='6.1.0 6.2.0'\n"
        "MAX_REQUEST_SIZE=2M\nCOMPILE_MEMORY=1G\nMAX_COMPILES=3\nIO_TIMEOUT=2.5\n"
        'CACHE_SIZE=0\nLOG_FILE="$STATE_DIR/log"\n',
        "f.conf",
    )
    assert config.port == 1234
    assert config.listen_address == "::1"
    assert config.state_dir == Path("/srv/st")
    assert config.releases == ("6.1.0", "6.2.0")
    assert config.max_request_size == 2 * 1024 * 1024
    assert config.compile_memory == 1024**3
    assert config.workers == 3
    assert config.io_timeout == 2.5
    assert config.cache_size == 0
    assert config.log_file == Path("/srv/st/log")
    assert config.cert_dir == Path("/srv/st/.systemtap/ssl/server")


def test_numbers_are_read_as_everywhere_else() -> None:
    """Seconds and sizes follow the project's one rule (stapinit.core.values)."""
    config = parse_config(
        "COMPILE_TIMEOUT=1e3\nQUEUE_TIMEOUT=0.25\nHANDSHAKE_TIMEOUT=2\nCACHE_SIZE=64k\n"
        "SANDBOX=no\nMAX_CONNECTIONS_PER_CLIENT=2\n",
        "f.conf",
    )
    assert config.compile_timeout == 1000.0
    assert config.queue_timeout == 0.25
    assert config.handshake_timeout == 2.0
    assert config.cache_size == 64 * 1024
    assert config.sandbox is False
    assert config.max_connections_per_client == 2


def test_zero_compiles_means_cpu_count() -> None:
    assert parse_config("MAX_COMPILES=0\n", "f").workers == (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("PORT=0\n", "f.conf:1: PORT='0': '0' is not from 1 to 65535"),
        ("\nPORT=http\n", "f.conf:2: PORT='http': 'http' is not a whole number"),
        ("LISTEN_ADDRESS=localhost\n", "f.conf:1: LISTEN_ADDRESS='localhost'"),
        ("STATE_DIR=relative\n", "is not an absolute path"),
        ("MAX_REQUEST_SIZE=8T\n", "is not a size"),
        ("IO_TIMEOUT=0\n", "f.conf:1: IO_TIMEOUT='0': '0' is not a positive, finite number"),
        ("\nCOMPILE_TIMEOUT=inf\n", "f.conf:2: COMPILE_TIMEOUT='inf': 'inf' is not a positive"),
        ("QUEUE_TIMEOUT=nan\n", "f.conf:1: QUEUE_TIMEOUT='nan': 'nan' is not a positive"),
        ("HANDSHAKE_TIMEOUT=-5\n", "f.conf:1: HANDSHAKE_TIMEOUT='-5': '-5' is not a positive"),
        ("SANDBOX=maybe\n", "f.conf:1: SANDBOX='maybe': 'maybe' is not a boolean"),
        ("MAX_CONNECTIONS_PER_CLIENT=0\n", "f.conf:1: MAX_CONNECTIONS_PER_CLIENT='0'"),
        ("STAP=bin/stap\n", "f.conf:1: STAP='bin/stap': 'bin/stap' is neither"),
        ("RELEASES='6.1 ../x'\n", "is not a kernel release"),
        ("USER='a b'\n", "is not a single word"),
        ("POTR=1\n", "f.conf:1: unknown setting POTR"),
        ("PORT=$(id)\n", "f.conf:1:"),
    ],
)
def test_bad_values_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigFileError) as err:
        parse_config(text, "f.conf")
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == EXIT_NOT_CONFIGURED


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot read config file"):
        load_config(tmp_path / "missing.conf")


@pytest.mark.parametrize(
    ("name", "reason"),
    [("fifo", "not a regular file"), ("dev", "not a regular file"), ("big", "larger than")],
)
def test_only_a_small_regular_file_is_read(tmp_path: Path, name: str, reason: str) -> None:
    path = tmp_path / name
    if name == "fifo":
        os.mkfifo(path)  # nobody writes: reading it would block for ever
    elif name == "dev":
        path = Path("/dev/zero")  # would never end
    else:
        path.write_text("# x\n" * 300_000)
    with pytest.raises(ConfigFileError, match=f"cannot read config file: {reason}"):
        load_config(path)
