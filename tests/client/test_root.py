"""Issue 10 #5 and its siblings: as root, no user's file chooses what root runs.

Each test performs the attack for real: a real user writes the files, root runs
the real ``stap-client`` with the user's ``HOME`` (as ``sudo -E`` does) or
with ``STAP_TRUST_ROOT`` pointing into the user's tree, and the test checks
that the user's program never ran.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.client.conftest import HELLO, Site
from tests.trust.people import User, run_as


def plant(user: User, path: Path, text: str, mode: int = 0o644) -> Path:
    """``path`` with ``text``, made and owned by ``user`` (with its missing directories)."""
    missing = [p for p in (*reversed(path.parents),) if not p.exists()]
    for directory in missing:
        directory.mkdir(mode=0o755)
        os.chown(directory, user.uid, user.gid)
    path.write_text(text)
    path.chmod(mode)
    os.chown(path, user.uid, user.gid)
    return path


def evil_program(site: Site, user: User) -> tuple[Path, Path]:
    """A user's program that leaves proof of who ran it; (program, proof file)."""
    proof = site.base / "PROOF"
    program = plant(
        user,
        site.homes[user.name] / "evil.sh",
        f"#!/bin/sh\nid -u > {proof}\nexec sleep 0\n",
        0o755,
    )
    return program, proof


def root_client(site: Site, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_as(None, ["stap-client", *args], env, site.base)


def test_a_users_client_conf_under_sudo_e_is_ignored(site: Site) -> None:
    site.authorize_server()
    user = site.users["sttest_plain"]
    home = site.homes["sttest_plain"]
    evil, proof = evil_program(site, user)
    conf = plant(
        user,
        home / ".systemtap" / "client.conf",
        f"[client]\nstapbpf = {evil}\nstaprun = {evil}\nservers = 127.0.0.1:1\n",
    )
    env = {"STAP_TRUST_ROOT": str(site.trust_root), "HOME": str(home)}
    result = root_client(site, env, "-e", HELLO)
    assert not proof.exists(), "root ran the user's program"
    assert (result.returncode, result.stdout) == (0, "Hello\n"), result.stderr
    assert (
        f"stap-client: ignoring {conf}: root reads only files that root alone can change: "
        f"{conf} is owned by uid {user.uid}, not root"
    ) in result.stderr.splitlines()


def test_a_root_owned_file_in_a_users_directory_is_ignored_too(site: Site) -> None:
    # The user may rename root's file away and put theirs in its place.
    site.authorize_server()
    user = site.users["sttest_plain"]
    home = site.homes["sttest_plain"]
    evil, proof = evil_program(site, user)
    conf = plant(user, home / ".systemtap" / "client.conf", f"[client]\nstapbpf = {evil}\n")
    os.chown(conf, 0, 0)
    env = {"STAP_TRUST_ROOT": str(site.trust_root), "HOME": str(home)}
    result = root_client(site, env, "-e", HELLO)
    assert not proof.exists()
    assert result.stdout == "Hello\n", result.stderr
    assert f"{conf.parent} is owned by uid {user.uid}, not root" in result.stderr


def test_stap_trust_root_in_a_users_tree_chooses_nothing(site: Site) -> None:
    user = site.users["sttest_plain"]
    evil, proof = evil_program(site, user)
    fake = site.homes["sttest_plain"] / "fake"
    conf = plant(
        user,
        fake / "etc" / "systemtap" / "client.conf",
        f"[client]\nservers = 127.0.0.1:{site.server.port}\nruntime = bpf\nstapbpf = {evil}\n",
    )
    plant(user, fake / "etc/systemtap/ssl/client" / "trusted.pem", "not used\n")
    env = {"STAP_TRUST_ROOT": str(fake), "HOME": str(site.homes["root"])}
    result = root_client(site, env, "--server", f"127.0.0.1:{site.server.port}", "-e", HELLO)
    assert not proof.exists()
    assert result.returncode == 1 and result.stdout == ""
    assert f"ignoring {conf}: root reads only files that root alone can change" in result.stderr
    assert "ignoring the system-wide server trust store" in result.stderr
    assert "is not trusted" in result.stderr


def test_root_runs_no_tool_another_user_could_change(site: Site) -> None:
    # Named in root's own file, but in a directory a user owns.
    site.authorize_server()
    user = site.users["sttest_plain"]
    evil, proof = evil_program(site, user)
    (site.trust_root / "etc/systemtap/client.conf").write_text(
        f"[client]\nservers = 127.0.0.1:{site.server.port}\nruntime = bpf\nstapbpf = {evil}\n"
    )
    env = {"STAP_TRUST_ROOT": str(site.trust_root), "HOME": str(site.homes["root"])}
    result = root_client(site, env, "-e", HELLO)
    assert not proof.exists()
    assert result.returncode == 1 and result.stdout == ""
    # Refused before the server was asked to compile anything.
    assert result.stderr == (
        f"stap-client: will not run {evil} as root: {evil} is owned by uid {user.uid}, not root\n"
    )


def test_roots_own_per_user_file_is_read(site: Site) -> None:
    own = site.homes["root"] / ".systemtap"
    own.mkdir()
    (own / "client.conf").write_text("[client]\nservers = 127.0.0.1:1\n")
    result = site.client("root", "-e", HELLO)
    assert result.returncode == 1
    assert (
        result.stderr == "stap-client: cannot connect to server 127.0.0.1:1: Connection refused\n"
    )
