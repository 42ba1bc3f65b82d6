from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.tools import build_stapbpf_wrapper


@pytest.fixture(scope="session")
def stapbpf_wrapper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``stapbpf`` that runs the real one with the test-only memlock shim."""
    return build_stapbpf_wrapper(tmp_path_factory.mktemp("stapbpf"))


@pytest.fixture(scope="session")
def real_stap() -> Path:
    """Path of the real ``stap``."""
    path = shutil.which("stap")
    if path is None:
        pytest.fail("stap is not installed; run dev/setup-host")
    return Path(path)
