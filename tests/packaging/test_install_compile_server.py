"""``make install-server``, ``make install-client`` and ``make server-user``."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.packaging.conftest import REPO, SYSTEM_PATH, make_install, source_tree
from tests.server.helpers import ensure_service_user
from tests.trust.people import shared_tmpdir

SRC = REPO / "src"
DEBIANS_PYTHON = "/usr/bin/python3"

SERVER_FILES = {
    "usr/bin/stap-server": 0o755,
    "etc/stap-server/stap-server.conf": 0o644,
    "usr/lib/systemd/system/stap-server.service": 0o644,
    "etc/logrotate.d/stap-server": 0o644,
    "usr/share/doc/systemtap-compile-server/README.md": 0o644,
    "usr/share/man/man8/stap-server.8": 0o644,
}
CLIENT_FILES = {
    "usr/bin/stap-client": 0o755,
    "usr/bin/stap-authorize-server-cert": 0o755,
    "usr/bin/stap-authorize-signing-cert": 0o755,
    "usr/sbin/stap-loader": 0o755,
    "etc/systemtap/client.conf": 0o644,
    "etc/systemtap/stap-loader.conf": 0o644,
    "usr/lib/systemd/system/stap-loader.socket": 0o644,
    "usr/lib/systemd/system/stap-loader.service": 0o644,
    "usr/share/doc/systemtap-compile-client/README.md": 0o644,
    "usr/share/man/man1/stap-client.1": 0o644,
    "usr/share/man/man1/stap-authorize-server-cert.1": 0o644,
    "usr/share/man/man8/stap-authorize-signing-cert.8": 0o644,
    "usr/share/man/man8/stap-loader.8": 0o644,
}
TRUST_STORES = ("etc/systemtap/ssl/client", "etc/systemtap/staprun")


def python_sources(library: str, *packages: str) -> set[str]:
    """The top-level modules, the trust code and ``packages``, as installed in ``library``."""
    root = SRC / "stapinit"
    files = {*root.glob("*.py"), root / "py.typed"}
    for package in ("core", "trust", *packages):
        files |= set((root / package).rglob("*.py"))
    return {f"usr/lib/{library}/{p.relative_to(SRC)}" for p in files}


def server_sources() -> set[str]:
    return python_sources("systemtap-compile-server", "server")


def client_sources() -> set[str]:
    return python_sources("systemtap-compile-client", "client", "loader")


def files_of(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
        for p in root.rglob("*")
        if p.is_file()
    }


def unit_setting(unit: Path, key: str) -> str:
    [line] = [line for line in unit.read_text().splitlines() if line.startswith(f"{key}=")]
    return line.partition("=")[2]


def test_make_install_server_lays_every_file_in_its_place(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    make_install(f"DESTDIR={stage}", "PREFIX=/usr", target="install-server")
    files = files_of(stage)
    assert set(files) == set(SERVER_FILES) | server_sources()
    for name, mode in SERVER_FILES.items():
        assert files[name] == mode, name
    # Staging creates no user and no directory outside the staged tree's files.
    assert not (stage / "var").exists()
    launcher = (stage / "usr/bin/stap-server").read_text().splitlines()
    assert launcher[0] == "#!/usr/bin/python3 -I"
    assert 'sys.path.insert(0, "/usr/lib/systemtap-compile-server")' in launcher
    unit = stage / "usr/lib/systemd/system/stap-server.service"
    assert "@" not in unit.read_text()
    assert unit_setting(unit, "ExecStart") == (
        "/usr/bin/stap-server -c /etc/stap-server/stap-server.conf run"
    )
    # Started as root: the server reads its key, then drops to USER=stap-server.
    assert "\nUser=" not in unit.read_text()
    assert unit_setting(unit, "Documentation") == (
        "file:/usr/share/doc/systemtap-compile-server/README.md"
    )
    config = (stage / "etc/stap-server/stap-server.conf").read_bytes()
    assert config == (REPO / "data/server/stap-server.conf").read_bytes()


def test_make_install_client_lays_every_file_in_its_place(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    make_install(f"DESTDIR={stage}", "PREFIX=/usr", target="install-client")
    files = files_of(stage)
    assert set(files) == set(CLIENT_FILES) | client_sources()
    for name, mode in CLIENT_FILES.items():
        assert files[name] == mode, name
    for store in TRUST_STORES:
        # Empty, and like every directory above them never writable by group or others.
        assert not list((stage / store).iterdir()), store
        for directory in (stage / store, *(stage / store).parents):
            if directory == stage:
                break
            assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory
    units = stage / "usr/lib/systemd/system"
    assert "@" not in (units / "stap-loader.service").read_text()
    assert "@" not in (units / "stap-loader.socket").read_text()
    assert unit_setting(units / "stap-loader.service", "ExecStart") == (
        "/usr/sbin/stap-loader --config /etc/systemtap/stap-loader.conf"
    )
    assert unit_setting(units / "stap-loader.socket", "ListenStream") == "/run/stap-loader.sock"
    assert unit_setting(units / "stap-loader.socket", "SocketMode") == "0666"
    for command in ("stap-client", "stap-authorize-server-cert", "stap-authorize-signing-cert"):
        first = (stage / "usr/bin" / command).read_text().splitlines()[0]
        assert first == "#!/usr/bin/python3 -I", command


def test_make_install_server_and_client_keep_edited_configs(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    configs = [
        "etc/stap-server/stap-server.conf",
        "etc/systemtap/client.conf",
        "etc/systemtap/stap-loader.conf",
    ]
    for target in ("install-server", "install-client"):
        make_install(f"DESTDIR={stage}", "PREFIX=/usr", target=target)
    for config in configs:
        (stage / config).write_text("# edited\n")
    for target in ("install-server", "install-client"):
        make_install(f"DESTDIR={stage}", "PREFIX=/usr", target=target)
    for config in configs:
        assert (stage / config).read_text() == "# edited\n", config


CHECK_LIBRARY = """
import datetime as dt, importlib, pathlib, sys, tempfile
library = pathlib.Path(sys.argv[1])
sys.path.insert(0, str(library))
for file in sorted(library.rglob("*.py")):
    name = ".".join(file.relative_to(library).with_suffix("").parts)
    importlib.import_module(name.removesuffix(".__init__"))
from stapinit.trust import certs
directory = pathlib.Path(tempfile.mkdtemp())
key, cert = certs.generate_identity(directory / "key", directory / "cert", "host", 2)
left = certs.describe(cert).not_after - dt.datetime.now(dt.UTC)
print(sys.modules["cryptography"].__file__, left.days)
"""


@pytest.mark.parametrize(
    ("target", "library"),
    [
        ("install-server", "systemtap-compile-server"),
        ("install-client", "systemtap-compile-client"),
    ],
)
def test_each_private_library_works_alone_on_debians_python(
    tmp_path: Path, target: str, library: str
) -> None:
    """Every installed module imports from its own directory, with Debian's cryptography."""
    stage = tmp_path / "stage"
    make_install(f"DESTDIR={stage}", "PREFIX=/usr", target=target)
    done = subprocess.run(
        [DEBIANS_PYTHON, "-I", "-c", CHECK_LIBRARY, str(stage / "usr/lib" / library)],
        capture_output=True,
        text=True,
    )
    if "No module named 'cryptography'" in done.stderr:
        pytest.fail("python3-cryptography is not installed; run dev/setup-host")
    assert done.returncode == 0, done.stderr
    where, days = done.stdout.split()
    assert where.startswith("/usr/lib/python3/dist-packages/cryptography/")
    assert days == "1"  # validity read back as an aware UTC datetime


def test_installed_commands_run_isolated_and_server_dirs_have_their_owners(tmp_path: Path) -> None:
    """A live install as root (no DESTDIR) also runs ``make server-user``."""
    user = ensure_service_user()
    prefix, etc, var = tmp_path / "usr", tmp_path / "etc", tmp_path / "var"
    paths = (f"PREFIX={prefix}", f"SYSCONFDIR={etc}", f"LOCALSTATEDIR={var}")
    for _ in range(2):  # a second install changes nothing
        make_install(*paths, target="install-server")
        make_install(*paths, target="install-client")
    # The state dir is root's (the key is read there before the drop); the log dir the user's.
    expected = (
        (var / "lib/stap-server", 0, 0, 0o755),
        (var / "log/stap-server", user.pw_uid, user.pw_gid, 0o750),
    )
    for directory, uid, gid, mode in expected:
        info = directory.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, gid, mode)
    # A PYTHONPATH cannot slip another stapinit into what runs (often as root).
    evil = tmp_path / "evil" / "stapinit"
    evil.mkdir(parents=True)
    (evil / "__init__.py").write_text("raise SystemExit('hijacked')\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(evil.parent),
        "STAP_TRUST_ROOT": str(tmp_path),
    }
    for command in ("bin/stap-server", "bin/stap-client", "sbin/stap-loader"):
        done = subprocess.run([str(prefix / command), "--help"], capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.startswith(f"usage: {Path(command).name} "), command
    config = tmp_path / "stap-server.conf"
    config.write_text(f"PID_FILE={tmp_path / 'run/stap-server.pid'}\n")
    status = subprocess.run(
        [str(prefix / "bin/stap-server"), "-c", str(config), "status"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert (status.returncode, status.stdout) == (3, "stap-server is stopped\n")
    listed = subprocess.run(
        [str(prefix / "bin/stap-authorize-server-cert"), "--list"],
        capture_output=True,
        text=True,
        env=env,
    )
    store = etc / "systemtap/ssl/client"
    assert (listed.returncode, listed.stderr) == (0, "")
    assert listed.stdout == f"system-wide server trust store ({store}): 0 certificate(s)\n"
    # The units, as installed, name commands that exist.
    units = [prefix / "lib/systemd/system" / name for name in ("stap-server.service",)]
    units += [
        prefix / "lib/systemd/system" / f"stap-loader.{kind}" for kind in ("socket", "service")
    ]
    assert unit_setting(units[0], "ExecStart").startswith(f"{prefix}/bin/stap-server -c {etc}/")
    assert unit_setting(units[2], "ExecStart").startswith(f"{prefix}/sbin/stap-loader --config ")
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)], capture_output=True, text=True
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_make_install_server_without_root_says_how_to_add_the_user(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    base = shared_tmpdir("sttest-make-")
    try:
        # A copy nobody can read: the checkout may be private to its owner.
        source = source_tree(base / "source")
        for path in (source, *source.rglob("*")):
            path.chmod(path.stat().st_mode | (0o005 if path.is_dir() else 0o004))
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        done = subprocess.run(
            [
                "make",
                "-s",
                "-C",
                str(source),
                "install-server",
                f"PREFIX={base / 'usr'}",
                f"SYSCONFDIR={base / 'etc'}",
                f"LOCALSTATEDIR={base / 'var'}",
            ],
            capture_output=True,
            text=True,
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout == "Now run 'make server-user' as root: stap-server runs as user stap-server.\n"
    )


def test_server_log_rotation_runs_as_the_service_user() -> None:
    user = ensure_service_user()
    rule = (REPO / "data/logrotate/stap-server").read_text()
    base = shared_tmpdir("sttest-rotate-")
    try:
        logs = base / "log"
        logs.mkdir(mode=0o750)
        os.chown(logs, user.pw_uid, user.pw_gid)
        log = logs / "stap-server.log"
        log.write_text("before\n")
        os.chown(log, user.pw_uid, user.pw_gid)
        config = base / "rule"
        config.write_text(rule.replace("/var/log/stap-server/stap-server.log", str(log)))
        done = subprocess.run(
            ["logrotate", "-f", "-s", str(base / "state"), str(config)],
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": SYSTEM_PATH},
        )
        assert done.returncode == 0, done.stderr
        assert (logs / "stap-server.log.1").read_text() == "before\n"
        info = log.stat()
        group = grp.getgrgid(info.st_gid).gr_name
        assert (info.st_uid, group, stat.S_IMODE(info.st_mode)) == (
            user.pw_uid,
            "stap-server",
            0o640,
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
