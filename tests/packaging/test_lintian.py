"""Debian's own checker finds nothing wrong with the built packages."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.packaging.conftest import PACKAGES, SYSTEM_PATH, BuiltDebs


@pytest.mark.xdist_group("deb")
def test_lintian_pedantic_reports_no_errors_or_warnings(built_debs: BuiltDebs) -> None:
    """``lintian --pedantic`` on every .deb: no E: or W: tag (I: and P: are advice)."""
    lintian = shutil.which("lintian", path=SYSTEM_PATH)
    if lintian is None:
        pytest.fail("lintian is not installed; run dev/setup-host --tests")
    done = subprocess.run(
        [lintian, "--pedantic", *(str(built_debs.deb(p)) for p in PACKAGES)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    tags = [line for line in done.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert tags == [], done.stdout
    assert done.returncode == 0, done.stderr  # it ran: no crash, no unreadable package
