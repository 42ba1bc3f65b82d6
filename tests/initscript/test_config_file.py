"""``-c FILE``: which files may be the global configuration."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stapinit.core.bashvars import ConfigError
from stapinit.initscript.settings import DEFAULTS, load_settings
from tests.support.prefix import COMMAND


def test_dev_null_is_an_empty_configuration() -> None:
    settings = load_settings(Path("/dev/null"), environment={})
    assert str(settings.script_path) == DEFAULTS["SCRIPT_PATH"]
    assert settings.files_read == ()


def test_dev_null_works_from_the_command_line() -> None:
    done = subprocess.run(
        [COMMAND, "status", "-c", "/dev/null"], capture_output=True, text=True, timeout=60
    )
    # The defaults apply: what is missing next is the default script directory, if anything.
    assert "no such configuration file" not in done.stderr
    assert "Traceback" not in done.stderr
    assert done.returncode in (0, 3, 6)


def test_a_directory_or_other_device_is_not_a_configuration_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"{tmp_path}.*: not a regular file"):
        load_settings(tmp_path, environment={})
    with pytest.raises(ConfigError, match=r"/dev/zero.*: not a regular file"):
        load_settings(Path("/dev/zero"), environment={})
