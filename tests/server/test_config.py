"""The server's configuration file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stapinit.server.config import BadConfig, ServerConfig, load_config, parse_config

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


def test_zero_compiles_means_cpu_count() -> None:
    assert parse_config("MAX_COMPILES=0\n", "f").workers == (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("PORT=0\n", "f.conf:1: PORT='0': expected a number from 1 to 65535"),
        ("\nPORT=http\n", "f.conf:2: PORT='http': expected a whole number"),
        ("LISTEN_ADDRESS=localhost\n", "f.conf:1: LISTEN_ADDRESS='localhost'"),
        ("STATE_DIR=relative\n", "expected an absolute path"),
        ("MAX_REQUEST_SIZE=8T\n", "expected a size"),
        ("IO_TIMEOUT=0\n", "more than 0 seconds"),
        ("RELEASES='6.1 ../x'\n", "is not a kernel release"),
        ("USER='a b'\n", "a single word"),
        ("POTR=1\n", "f.conf:1: unknown setting POTR"),
        ("PORT=$(id)\n", "f.conf:1:"),
    ],
)
def test_bad_values_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(BadConfig) as err:
        parse_config(text, "f.conf")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(BadConfig, match="cannot read config file"):
        load_config(tmp_path / "missing.conf")
