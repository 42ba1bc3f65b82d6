"""The compile sandbox's command line (pure) and what it takes from this host."""

from __future__ import annotations

import os
from pathlib import Path

from stapinit.server.sandbox import (
    INSIDE_WORKDIR,
    HostEntry,
    host_entries,
    mount_arguments,
    sandbox_command,
)


def test_mounts_are_read_only_and_links_stay_links() -> None:
    entries = [
        HostEntry("/usr"),
        HostEntry("/lib", "usr/lib"),
        HostEntry("/lib/modules/6.1.0"),  # reached through the /lib link
        HostEntry("/usr/src/linux-headers-6.1.0"),  # inside /usr already
        HostEntry("/opt/kernels/6.1.0-build"),
        HostEntry("/opt/kernels/6.1.0-build"),
    ]
    assert mount_arguments(entries) == [
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/lib", "/lib",
        "--ro-bind", "/opt/kernels/6.1.0-build", "/opt/kernels/6.1.0-build",
    ]  # fmt: skip


def test_command_confines_everything_and_binds_only_the_compile_directory() -> None:
    argv = sandbox_command(
        "/usr/bin/bwrap", ["--ro-bind", "/usr", "/usr"], "/state/tmp/stap-1", ["stap", "-V"]
    )
    assert argv[0] == "/usr/bin/bwrap"
    assert argv[-3:] == ["--", "stap", "-V"]
    options = argv[1:-3]
    for flag in (
        "--unshare-all",
        "--unshare-user",
        "--die-with-parent",
        "--new-session",
    ):
        assert flag in options
    # The only writable bind is the compile's own directory, at a fixed place.
    binds = [options[i + 1 : i + 3] for i, word in enumerate(options) if word == "--bind"]
    assert binds == [["/state/tmp/stap-1", INSIDE_WORKDIR]]
    assert options[options.index("--chdir") + 1] == f"{INSIDE_WORKDIR}/build"
    # Private /tmp first, so that host paths bound below it stay visible.
    assert options.index("--tmpfs") < options.index("--ro-bind")
    assert "--share-net" not in options


def test_host_entries_hold_what_a_compile_needs_and_nothing_private(tmp_path: Path) -> None:
    release = os.uname().release
    wrapper = tmp_path / "stap-wrapper"
    wrapper.write_text("#!/bin/sh\n")
    entries = {entry.path: entry for entry in host_entries([release], [str(wrapper)], ["/srv/x"])}
    assert "/usr" in entries
    assert str(wrapper) in entries
    build = os.path.realpath(f"/lib/modules/{release}/build")
    if os.path.exists(build):
        assert build in entries
    assert "/srv/x" not in entries  # missing paths are left out
    for private in ("/etc", "/home", "/root", "/var", "/run", "/tmp", "/etc/passwd", "/etc/shadow"):
        assert private not in entries
    if os.path.islink("/lib"):
        assert entries["/lib"].link_target == os.readlink("/lib")
