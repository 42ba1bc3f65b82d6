"""Fixtures for stap-server tests: a private base directory and running servers."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.server.helpers import Server, ensure_service_user, make_server

ServerFactory = Callable[..., Server]


@pytest.fixture(scope="session")
def base_dir() -> Iterator[Path]:
    """A directory the service user can traverse (pytest's tmp_path is root-only)."""
    if os.geteuid() != 0:
        pytest.skip("stap-server end-to-end tests run as root (they switch to stap-server)")
    ensure_service_user()
    path = Path(tempfile.mkdtemp(prefix="stap-server-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_server(base_dir: Path) -> Iterator[Server]:
    """One running server for the tests that do not need special settings."""
    # Programs the tests probe live in base_dir/victim: the compiles may read it.
    victims = base_dir / "victim"
    victims.mkdir(mode=0o755, exist_ok=True)
    server = make_server(
        base_dir, "shared", IO_TIMEOUT="2", MAX_REQUEST_SIZE="64K", SANDBOX_PATHS=str(victims)
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server_factory(base_dir: Path, request: pytest.FixtureRequest) -> Iterator[ServerFactory]:
    """Make servers with their own settings; all are stopped afterwards."""
    made: list[Server] = []

    def make(**settings: str) -> Server:
        # Short enough for paths, unique even among parametrized variants.
        digest = hashlib.sha256(request.node.name.encode()).hexdigest()[:8]
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:32] + "-" + digest
        server = make_server(base_dir, f"{name}-{len(made)}", **settings)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()
