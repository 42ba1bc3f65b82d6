"""Real kernel modules through ``compile``, the cache, ``pack``/``unpack`` and the compile
server (spec §2.2.5, §5.7-5.8, §6).

Only the compiles are real: the modules are for a kernel release this host does not run,
and this kernel cannot load modules at all, so starting and stopping kernel-module
scripts stays with the stand-ins of tests/initscript/test_run_kmod_e2e.py.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from stapinit.initscript.cache import CacheRecord
from stapinit.trust.certs import load_certificate
from stapinit.trust.signing import verify_module
from tests.kmod_real.conftest import HELLO, Built, Toolchain
from tests.kmod_real.modinfo import ET_REL, elf_type, modinfo
from tests.server.helpers import STAP_SERVER, ensure_service_user, make_server
from tests.support.kernels import build_link_target
from tests.support.prefix import COMMAND, Prefix
from tests.trust.people import SYSTEM_PATH, VENV_BIN, shared_tmpdir

SCRIPTS = ("hello", "ticker")
#: One worker runs them all, so the session's modules are compiled once.
pytestmark = pytest.mark.xdist_group("kmod_real")


def test_compile_makes_modules_for_the_release_and_records_them(built: Built) -> None:
    release = built.toolchain.release
    assert sorted(p.name for p in built.cache.iterdir()) == [
        f"{name}{suffix}" for name in SCRIPTS for suffix in (".ko", ".opts")
    ]
    for name in SCRIPTS:
        module = (built.cache / f"{name}.ko").read_bytes()
        assert elf_type(module) == ET_REL
        info = modinfo(module)
        # What the kernel checks before loading: built for exactly this release.
        assert info["vermagic"].split()[0] == release, info["vermagic"]
        assert info["name"] == name
        record = CacheRecord.from_text((built.cache / f"{name}.opts").read_text())
        assert record is not None
        # Not the running kernel: its build (uname -v) is unknown and left empty.
        assert record.kernel == (release, "", platform.machine())
        assert (record.runtime, record.options) == ("kmod", ())
    # Nothing for the running kernel, and no compile directory left behind.
    assert not built.prefix.cache_dir().exists()
    assert list((built.prefix.root / "tmp").iterdir()) == []


def test_pack_and_unpack_carry_real_modules_to_a_host_without_a_compiler(
    built: Built, tmp_path: Path
) -> None:
    release = built.toolchain.release
    archive = tmp_path / f"stap-scripts-{release}.tar.gz"
    packed = built.prefix.run("pack", "-r", release, "-o", str(archive), "ticker")
    assert packed.returncode == 0, packed.stderr
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    # ticker brings what it requires.
    for name in SCRIPTS:
        assert {f"cache/{release}/{name}.ko", f"cache/{release}/{name}.opts"} <= names
        assert f"conf.d/{name}.conf" in names

    target = Prefix(
        tmp_path / "target",
        {
            "STAP": str(tmp_path / "no-compiler" / "stap"),
            "AUTOCOMPILE": "no",
            "ALLOW_CACHEONLY": "yes",
        },
    )
    # unpack installs only releases installed on the target.
    command = [COMMAND, "unpack", "-y", str(archive), "-c", str(target.config)]
    unpacked = subprocess.run(
        [*with_release_installed(built.toolchain), *command],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    assert unpacked.returncode == 0, unpacked.stderr
    for name in SCRIPTS:
        for suffix in (".ko", ".opts"):
            carried = target.cache_dir(release) / f"{name}{suffix}"
            assert carried.read_bytes() == (built.cache / f"{name}{suffix}").read_bytes()
        # The requirement travels with the scripts (pack adds a comment of its own).
        carried_conf = (target.root / "conf.d" / f"{name}.conf").read_text().splitlines()
        own_conf = (built.prefix.root / "conf.d" / f"{name}.conf").read_text().splitlines()
        assert [line for line in carried_conf if not line.startswith("#")] == own_conf
    module = (target.cache_dir(release) / "hello.ko").read_bytes()
    assert modinfo(module)["vermagic"].split()[0] == release


def test_compile_server_builds_and_signs_a_real_module(toolchain: Toolchain) -> None:
    """stap-client -p4 --unprivileged from a stap-server whose stap builds kernel modules.

    On Debian 13 the server compiles in its sandbox as usual. With the Debian 13 root,
    the server runs stap as its service user, so the wrapper runs stap in a user
    namespace of its own, without the sandbox.
    """
    ensure_service_user()
    base = shared_tmpdir("sttest-kmod-server-")
    try:
        settings = {"STAP": str(toolchain.stap), "RELEASES": toolchain.release}
        if toolchain.root is not None:
            # The wrapper makes a user namespace, which the server's bubblewrap sandbox
            # forbids; stap of the Debian 13 root sees nothing of the host but /tmp.
            settings["SANDBOX"] = "no"
        server = make_server(base, "server", **settings)
        started = subprocess.run(
            [*with_release_installed(toolchain), str(STAP_SERVER), "-c", str(server.conf), "start"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert started.returncode == 0, started.stderr
        server.wait_until_serving()
        try:
            module, signature = _client_compiles(server.port, server.cert_path, base, toolchain)
        finally:
            server.stop()
        info = modinfo(module)
        assert info["vermagic"].split()[0] == toolchain.release
        manifest = verify_module(signature, module, [load_certificate(server.cert_path)])
        assert (manifest.release, manifest.arch) == (toolchain.release, platform.machine())
        assert manifest.privilege == "stapusr"
        assert manifest.module_name == info["name"] + ".ko"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def with_release_installed(toolchain: Toolchain) -> list[str]:
    """A command prefix that runs a command where ``toolchain``'s release is installed.

    ``unpack`` installs only the releases in /lib/modules, and the server serves a
    release only if /lib/modules/RELEASE/build exists, as on a host with those headers.
    With the Debian 13 root this host has them only inside the root: the command then
    runs in a private mount namespace whose /lib/modules (a tmpfs) holds RELEASE and its
    build link, leaving the host's own /lib/modules alone. Daemons started so stay in it.
    """
    if toolchain.root is None:
        return []
    build = build_link_target(toolchain.root, toolchain.release)
    script = (
        'mount -t tmpfs -o mode=0755 tmpfs /lib/modules && mkdir "/lib/modules/$1" && '
        'ln -s "$2" "/lib/modules/$1/build" && shift 2 && exec "$@"'
    )
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-ec",
        script,
        "sh",
        toolchain.release,
        str(build),
    ]


def _client_compiles(
    port: int, cert: Path, base: Path, toolchain: Toolchain
) -> tuple[bytes, bytes]:
    """Root trusts the server, then compiles with stap-client; the module and its .sgn."""
    trust_root = base / "root"
    (trust_root / "etc" / "systemtap").mkdir(parents=True)
    env = {"PATH": f"{VENV_BIN}:{SYSTEM_PATH}", "STAP_TRUST_ROOT": str(trust_root)}
    authorized = subprocess.run(
        ["stap-authorize-server-cert", str(cert)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert authorized.returncode == 0, authorized.stderr
    out = base / "out"
    out.mkdir()
    done = subprocess.run(
        [
            "stap-client",
            f"--server=127.0.0.1:{port}",
            "--runtime=kmod",
            "--unprivileged",
            "-p4",
            "-r",
            toolchain.release,
            "-e",
            HELLO,
        ],
        env={**env, "HOME": str(out)},
        cwd=out,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    name = done.stdout.strip()
    assert name.endswith(".ko") and os.sep not in name
    return (out / name).read_bytes(), (out / f"{name}.sgn").read_bytes()
