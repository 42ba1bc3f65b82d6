from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support import shared_install
from tests.support.tools import build_stapbpf_wrapper

# The commands, copied where every user can run them (see shared_install): made here,
# on import, because the conftests below name its paths when they are imported. xdist
# workers start later and inherit the variable, so one copy serves the whole run.
_MADE_SHARED_INSTALL = shared_install.ENV not in os.environ
if _MADE_SHARED_INSTALL:
    os.environ[shared_install.ENV] = str(shared_install.build())


def pytest_unconfigure(config: pytest.Config) -> None:
    if _MADE_SHARED_INSTALL:
        shared_install.remove(Path(os.environ.pop(shared_install.ENV)))


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
