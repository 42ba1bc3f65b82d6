"""A fresh install without kernel headers: the first failure says what to install."""

from __future__ import annotations

from pathlib import Path

from tests.support.prefix import Prefix

#: A release nobody has: no /lib/modules entry, no headers package.
NO_HEADERS = "0.0.0-no-headers"


def test_compiling_without_headers_names_the_package_to_install(tmp_path: Path) -> None:
    """The real stap refuses even a BPF script without the release's build tree."""
    prefix = Prefix(tmp_path / "prefix")
    prefix.add_script("hello", "probe begin { exit() }\n", options="--runtime=bpf")
    done = prefix.run("compile", "-r", NO_HEADERS)
    assert done.returncode == 1
    assert (
        f"systemtap-service: Failed to compile hello: no kernel headers for {NO_HEADERS}: "
        f"stap needs /lib/modules/{NO_HEADERS}/build; "
        f"install them (Debian: apt-get install linux-headers-{NO_HEADERS})\n"
    ) in done.stderr
    # stap's own words stay in the log.
    assert f'Checking "/lib/modules/{NO_HEADERS}/build/.config" failed' in prefix.log()
