"""``make install`` and every file it lays down (spec §3, §2.4.1, §5.4)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from stapinit import __version__
from stapinit.core.bashvars import parse_assignments
from stapinit.initscript.cli import COMMANDS
from stapinit.initscript.settings import DEFAULTS, settings_from_assignments
from tests.initscript.conftest import FakeTools
from tests.packaging.conftest import REPO, SYSTEM_PATH, Installed, make_install
from tests.support.prefix import RELEASE, Prefix

SCRIPT_FILES = {
    "usr/sbin/systemtap-service": 0o755,
    "etc/systemtap/config": 0o644,
    "etc/init.d/systemtap": 0o755,
    "usr/lib/systemd/system/systemtap.service": 0o644,
    "etc/logrotate.d/systemtap": 0o644,
    "etc/kernel/postinst.d/systemtap": 0o755,
    "etc/kernel/header_postinst.d/systemtap": 0o755,
    "etc/kernel/postrm.d/systemtap": 0o755,
    "usr/share/man/man8/systemtap-service.8": 0o644,
    "usr/share/bash-completion/completions/systemtap-service": 0o644,
}
EMPTY_DIRS = ("etc/systemtap/script.d", "etc/systemtap/conf.d", "var/cache/systemtap")


def python_sources() -> set[str]:
    """What systemtap-service imports: the service package, the shared helpers, and the
    wire format and trust code of COMPILE_SERVER and REQUIRE_SIGNED."""
    src = REPO / "src"
    files = {src / "stapinit" / name for name in ("__init__.py", "py.typed", "protocol.py")}
    for package in ("core", "initscript", "trust"):
        files |= set((src / "stapinit" / package).rglob("*.py"))
    return {f"usr/lib/systemtap-initscript/{p.relative_to(src)}" for p in files}


def test_make_install_lays_every_file_in_its_place(staged: Installed) -> None:
    files = {
        str(p.relative_to(staged.root)): stat.S_IMODE(p.stat().st_mode)
        for p in staged.root.rglob("*")
        if p.is_file()
    }
    assert set(files) == set(SCRIPT_FILES) | python_sources()
    for name, mode in SCRIPT_FILES.items():
        assert files[name] == mode, name
    for directory in EMPTY_DIRS:
        assert (staged.root / directory).is_dir()
        assert not list((staged.root / directory).iterdir())
    # The compile server and its cryptography stay out of the boot-time install.
    assert not (staged.root / "usr/lib/systemtap-initscript/stapinit/server").exists()
    for name in (
        "etc/init.d/systemtap",
        "etc/kernel/postinst.d/systemtap",
        "etc/kernel/postrm.d/systemtap",
    ):
        text = (staged.root / name).read_text()
        assert "@SBINDIR@" not in text
        assert "/usr/sbin/systemtap-service" in text
    unit = (staged.root / "usr/lib/systemd/system/systemtap.service").read_text()
    assert "ExecStart=/usr/sbin/systemtap-service watch\n" in unit


def test_default_config_documents_every_parameter_at_its_default(staged: Installed) -> None:
    text = (staged.root / "etc/systemtap/config").read_text()
    # As installed it sets nothing: every line is a comment.
    assert parse_assignments(text, "config", {}) == []
    for key, default in DEFAULTS.items():
        shown = default or '""'
        assert re.search(rf"^#{key}={re.escape(shown)}$", text, re.MULTILINE), key
    # Uncommenting every parameter changes nothing: the documented values are the defaults.
    uncommented = re.sub(r"^#([A-Z_]+=)", r"\1", text, flags=re.MULTILINE)
    assignments = parse_assignments(uncommented, "config", {})
    assert sorted(a.name for a in assignments) == sorted(DEFAULTS)
    defaults = settings_from_assignments([])
    assert settings_from_assignments(assignments)._replace(files_read=()) == defaults


def test_make_install_keeps_an_edited_config(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    make_install(f"DESTDIR={stage}", "PREFIX=/usr")
    config = stage / "etc/systemtap/config"
    config.write_text("AUTOCOMPILE=no\n")
    (stage / "etc/init.d/systemtap").write_text("stale\n")
    make_install(f"DESTDIR={stage}", "PREFIX=/usr")
    assert config.read_text() == "AUTOCOMPILE=no\n"
    assert (stage / "etc/init.d/systemtap").read_text() != "stale\n"


def test_installed_command_runs_on_debians_python_isolated(
    relocated: Installed, tmp_path: Path
) -> None:
    command = relocated.command
    assert command.read_text().splitlines()[0] == "#!/usr/bin/python3 -I"
    # A PYTHONPATH cannot slip another stapinit into what root runs at boot.
    evil = tmp_path / "evil" / "stapinit"
    evil.mkdir(parents=True)
    (evil / "__init__.py").write_text("raise SystemExit('hijacked')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(evil.parent)}
    version = subprocess.run([str(command), "--version"], capture_output=True, text=True, env=env)
    assert (version.returncode, version.stdout) == (0, f"systemtap-service {__version__}\n")
    prefix = Prefix(tmp_path / "prefix")
    status = subprocess.run(
        [str(command), "status", "-c", str(prefix.config)], capture_output=True, text=True, env=env
    )
    assert (status.returncode, status.stdout) == (3, "No systemtap scripts are present\n")


def test_init_script_headers(staged: Installed) -> None:
    text = (staged.root / "etc/init.d/systemtap").read_text()
    assert text.startswith("#!/bin/bash\n")
    assert "\n# chkconfig: - 00 99\n" in text
    block = text[text.index("### BEGIN INIT INFO\n") : text.index("### END INIT INFO\n")]
    fields = {}
    for line in block.splitlines()[1:]:
        match = re.match(r"# ([\w-]+):\s*(.*)$", line)
        if match:
            fields[match[1]] = match[2]
    assert fields["Provides"] == "systemtap"
    assert fields["Required-Start"] == "$local_fs"
    assert fields["Default-Start"] == "2 3 4 5"
    assert fields["Default-Stop"] == "0 1 6"
    assert fields["Short-Description"]


def test_init_script_hands_every_argument_to_the_command(
    relocated: Installed, tmp_path: Path, stapbpf_wrapper: Path
) -> None:
    init = relocated.path(relocated.sysconfdir / "init.d" / "systemtap")
    prefix = Prefix(tmp_path / "prefix", {"STAPBPF": str(stapbpf_wrapper)})
    out = tmp_path / "ticker.out"
    prefix.add_script("ticker", "probe timer.ms(50) { println(1) }\n", f"--runtime=bpf -o {out}")
    prefix.add_script("other", "probe timer.ms(50) { println(2) }\n", "--runtime=bpf")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(init), *args, "-c", str(prefix.config)], capture_output=True, text=True
        )

    try:
        started = run("start", "ticker")
        assert (started.returncode, started.stderr) == (0, "")
        assert re.fullmatch(r"Compiled ticker\nStarted ticker \(pid \d+\)\n", started.stdout)
        status = run("status")
        assert status.returncode == 3  # other is stopped
        assert re.search(r"^ticker\(\d+\) is running\.\.\.$", status.stdout, re.MULTILINE)
        assert "other is stopped" in status.stdout
    finally:
        stopped = run("stop")
    assert (stopped.returncode, stopped.stdout) == (0, "Stopped ticker\n")
    assert out.read_text()


def test_init_script_without_its_command_says_not_installed(
    relocated: Installed, tmp_path: Path
) -> None:
    relocated.command.unlink()
    init = relocated.path(relocated.sysconfdir / "init.d" / "systemtap")
    assert subprocess.run([str(init), "start"], capture_output=True).returncode == 5


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """``(section, key, value)`` for every setting; keys may repeat."""
    entries, section = [], ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            entries.append((section, key, value))
    return entries


def test_systemd_unit_is_an_early_notify_service_and_verifies(relocated: Installed) -> None:
    unit = relocated.path(relocated.prefix / "lib/systemd/system/systemtap.service")
    entries = unit_entries(unit.read_text())
    single = {(s, k): v for s, k, v in entries}
    command = relocated.command
    # The watcher reports the scripts to systemd (tests/system runs it under systemd).
    assert single["Service", "Type"] == "notify"
    assert ("Service", "RemainAfterExit") not in single
    assert single["Service", "ExecStart"] == f"{command} watch"
    assert single["Service", "ExecStop"] == f"{command} stop"
    assert single["Service", "ExecReload"] == f"{command} reload"
    # Stopping is left to the command, also after a failed start (see below).
    assert single["Service", "KillMode"] == "process"
    assert single["Service", "ExecStopPost"].startswith("-")
    assert single["Unit", "DefaultDependencies"] == "no"
    before = " ".join(v for s, k, v in entries if (s, k) == ("Unit", "Before")).split()
    after = " ".join(v for s, k, v in entries if (s, k) == ("Unit", "After")).split()
    assert "sysinit.target" in before and "local-fs.target" in after
    assert not {"basic.target", "network.target", "syslog.target"} & set(after)
    assert single["Install", "WantedBy"] == "multi-user.target"
    # The man page is not installed where man looks; the package test checks that too.
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    assert (done.returncode, done.stderr) == (0, "")


def exec_line(value: str) -> list[str]:
    """An Exec*= value as systemd runs it: ``-`` prefix dropped, ``$$`` unescaped, split."""
    return shlex.split(value.removeprefix("-").replace("$$", "$"))


def test_unit_stops_the_scripts_a_failed_start_left_running(
    relocated: Installed, tmp_path: Path
) -> None:
    """PASSALL=yes: one script fails, start exits 1 and the unit fails, so ExecStop
    never runs; ExecStopPost must then stop what did start. After a clean stop it does
    nothing more."""
    unit = relocated.path(relocated.prefix / "lib/systemd/system/systemtap.service")
    post = {k: v for s, k, v in unit_entries(unit.read_text()) if s == "Service"}["ExecStopPost"]
    tools = FakeTools(tmp_path)
    prefix = tools.prefix(tmp_path / "prefix")
    prefix.add_script("first", "probe begin { }\n")
    prefix.add_script("second", "probe begin { }\n", options="-s 9999")  # staprun refuses
    command = str(relocated.command)
    # The unit's command reads /etc/systemtap/config; point it at this prefix instead.
    argv = [
        word.replace(f"{command} stop", f"{command} stop -c {prefix.config}")
        for word in exec_line(post)
    ]
    assert argv != exec_line(post)

    def service(*args: str, result: str = "") -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **tools.env, "SERVICE_RESULT": result}
        run = list(args) or argv
        return subprocess.run(run, capture_output=True, text=True, env=env, check=False)

    started = service(command, "start", "-c", str(prefix.config))
    assert started.returncode == 1 and tools.loaded() == ["first"], started.stderr
    assert service(result="exit-code").returncode == 0
    assert tools.loaded() == []
    assert [p.name for p in prefix.stat.iterdir() if not p.name.startswith(".")] == []
    # After a successful start and ExecStop, the second stop is not even run.
    prefix.write_config(DEFAULT_START="first")
    assert service(command, "start", "-c", str(prefix.config)).returncode == 0
    calls = len(tools.calls_of("staprun"))
    assert service(result="success").returncode == 0
    assert tools.loaded() == ["first"] and len(tools.calls_of("staprun")) == calls
    assert service(command, "stop", "-c", str(prefix.config)).returncode == 0
    assert tools.loaded() == []


FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> {calls}
[ "$1" = -p ] && exit 0
echo "fake systemctl $*"
"""


def test_init_script_status_reports_the_scripts_not_the_unit(
    relocated: Installed, tmp_path: Path
) -> None:
    """Under systemd, Debian's init-functions send "service systemtap start" to
    systemctl; "status" must still ask systemtap-service, which reports each
    script (the unit's watcher says only whether all of them still run).

    Run in a private mount namespace that looks like a systemd host to
    /lib/lsb/init-functions: /run/systemd/system exists, the script is
    /etc/init.d/systemtap and systemctl (first on its PATH) records its calls.
    """
    calls = tmp_path / "systemctl.calls"
    fake_bin = tmp_path / "sbin"
    fake_bin.mkdir()
    (fake_bin / "systemctl").write_text(FAKE_SYSTEMCTL.format(calls=calls))
    (fake_bin / "systemctl").chmod(0o755)
    init_d = tmp_path / "init.d"
    init_d.mkdir()
    shutil.copy(relocated.path(relocated.sysconfdir / "init.d" / "systemtap"), init_d)
    setup = (
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system"
        f" && mount --bind {fake_bin} /usr/local/sbin && mount --bind {init_d} /etc/init.d"
        ' && exec /etc/init.d/systemtap "$1"'
    )

    def init(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", setup, "sh", action],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    started = init("start")
    assert "fake systemctl --no-pager start systemtap.service" in started.stdout, started.stderr
    calls.unlink()
    status = init("status")
    assert "fake systemctl" not in status.stdout
    # What systemtap-service says of this host's own configuration, whatever it is.
    assert status.returncode in (0, 1, 3, 4, 6), status.stderr
    assert status.stdout or status.stderr.startswith("systemtap-service: ")
    assert "Traceback" not in status.stderr
    assert not calls.exists() or "status" not in calls.read_text()


def test_man_page_renders_without_warnings_and_covers_everything(staged: Installed) -> None:
    page = staged.root / "usr/share/man/man8/systemtap-service.8"
    done = subprocess.run(
        ["man", "--warnings", "-l", str(page)],
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "200", "MAN_KEEP_FORMATTING": ""},
    )
    assert (done.returncode, done.stderr) == (0, "")
    text = re.sub(r"\s+", " ", done.stdout).replace("\u2010", "-")
    for command in COMMANDS:
        assert re.search(rf"\b{command}\b", text), command
    options = ["-r", "-c", "-R", "-y", "--json", "--all-kernels", "-o", "-h", "--help", "--version"]
    for option in options:
        assert f"{option} " in text or f"{option}," in text, option
    for parameter in DEFAULTS:
        assert parameter in text, parameter
    for path in [*SCRIPT_FILES, *EMPTY_DIRS]:
        if not path.startswith("usr/"):
            assert f"/{path}" in text, path
    assert "/lib/systemd/system/systemtap.service" in text


def complete(completion: Path, *words: str) -> list[str]:
    """What bash-completion offers for the last of ``words``."""
    script = (
        "source /usr/share/bash-completion/bash_completion\n"
        f"source {completion}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}\n'
        '_systemtap_service systemtap-service "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "-c", script, "bash", *words], capture_output=True, text=True, check=True
    )
    return sorted(done.stdout.split())


def test_bash_completion(staged: Installed, tmp_path: Path) -> None:
    completion = staged.root / "usr/share/bash-completion/completions/systemtap-service"
    prefix = Prefix(tmp_path / "prefix")
    for name in ("alpha", "alps", "beta"):
        (prefix.scripts / f"{name}.stp").write_text("probe begin { exit() }\n")
    config = str(prefix.config)
    assert complete(completion, "systemtap-service", "st") == ["start", "status", "stop"]
    assert complete(completion, "systemtap-service", "") == sorted(COMMANDS)
    assert complete(completion, "systemtap-service", "-c", config, "start", "al") == [
        "alpha",
        "alps",
    ]
    assert complete(completion, "systemtap-service", "stop", "-c", config, "") == [
        "alpha",
        "alps",
        "beta",
    ]
    assert complete(completion, "systemtap-service", "compile", "--a") == ["--all-kernels"]
    assert complete(completion, "systemtap-service", "pack", "-") == ["-c", "-o", "-r"]
    assert RELEASE in complete(completion, "systemtap-service", "compile", "-r", "")


def test_logrotate_rule_rotates_under_a_writer_that_keeps_its_file_open(
    staged: Installed, tmp_path: Path
) -> None:
    rule = (staged.root / "etc/logrotate.d/systemtap").read_text()
    log = tmp_path / "logs" / "systemtap.log"
    log.parent.mkdir()
    config = tmp_path / "rule"
    config.write_text(rule.replace("/var/log/systemtap.log", str(log)))
    state = tmp_path / "state"
    # Like stapbpf, whose output goes to the log through an O_APPEND descriptor.
    with log.open("ab", buffering=0) as writer:
        writer.write(b"before\n")
        for args in (["-d"], ["-f"]):
            done = subprocess.run(
                ["logrotate", *args, "-s", str(state), str(config)],
                capture_output=True,
                text=True,
                env={**os.environ, "PATH": SYSTEM_PATH},
            )
            assert done.returncode == 0, done.stderr
            assert "error" not in done.stderr.lower()
        writer.write(b"after\n")
    assert (log.parent / "systemtap.log.1").read_text() == "before\n"
    assert log.read_text() == "after\n"


def test_kernel_hooks_prepare_and_remove_caches_and_never_fail_the_kernel_package(
    relocated: Installed, tmp_path: Path
) -> None:
    hook = relocated.path(relocated.sysconfdir / "kernel/postinst.d/systemtap")
    headers_hook = relocated.path(relocated.sysconfdir / "kernel/header_postinst.d/systemtap")
    removal_hook = relocated.path(relocated.sysconfdir / "kernel/postrm.d/systemtap")
    assert headers_hook.read_bytes() == hook.read_bytes()
    calls = tmp_path / "calls"
    # Stand in for the command, to see how the hooks call it.
    relocated.command.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit "${{FAKE_EXIT:-0}}"\n')

    def run_hook(
        *args: str, code: str = "0", path: Path = hook
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FAKE_EXIT": code}
        return subprocess.run([str(path), *args], capture_output=True, text=True, env=env)

    done = run_hook(RELEASE, f"/boot/vmlinuz-{RELEASE}")
    assert (done.returncode, calls.read_text()) == (0, "compile --all-kernels -y\n")
    failed = run_hook(RELEASE, code="1")
    assert failed.returncode == 0
    assert failed.stderr == (
        f"systemtap: could not prepare every script for {RELEASE}: the boot scripts may not "
        "start on it; see /var/log/systemtap.log\n"
    )
    calls.unlink()
    # Without a build tree the command still decides: a compile server may prepare
    # the caches, or it says the scripts will not start on that kernel.
    assert run_hook("0.0.0-no-build-tree").returncode == 0
    assert calls.read_text() == "compile --all-kernels -y\n"
    calls.unlink()

    removed = run_hook("0.0.0-old", "/boot/vmlinuz-0.0.0-old", path=removal_hook)
    assert (removed.returncode, calls.read_text()) == (0, "cleanup -r 0.0.0-old -y\n")
    not_removed = run_hook("0.0.0-old", code="1", path=removal_hook)
    assert not_removed.returncode == 0
    assert not_removed.stderr == (
        "systemtap: could not remove the caches for 0.0.0-old; see /var/log/systemtap.log\n"
    )
    calls.unlink()
    assert run_hook().returncode == 0
    assert run_hook(path=removal_hook).returncode == 0
    assert not calls.exists()
    relocated.command.unlink()
    assert run_hook(RELEASE).returncode == 0
    assert run_hook(RELEASE, path=removal_hook).returncode == 0


MAINTAINER_SCRIPTS = [
    str(p.relative_to(REPO))
    for p in sorted((REPO / "debian").iterdir())
    if p.suffix in (".preinst", ".postinst", ".prerm", ".postrm")
]


@pytest.mark.parametrize(
    "path",
    [
        "data/init.d/systemtap",
        "data/kernel/postinst.d/systemtap",
        "data/kernel/postrm.d/systemtap",
        "data/bash-completion/systemtap-service",
        *MAINTAINER_SCRIPTS,
    ],
)
def test_shell_files_pass_shellcheck(path: str) -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed; run dev/setup-host"
    done = subprocess.run(
        [shellcheck, "--shell=bash" if "completion" in path else "--norc", str(REPO / path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout
