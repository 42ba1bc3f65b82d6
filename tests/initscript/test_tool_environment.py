"""Root's compiles and loaders never take another user's SystemTap settings (sudo -E)."""

from __future__ import annotations

from pathlib import Path

from stapinit.core.system import tool_environment
from tests.support.prefix import Prefix

TICK = "probe begin { exit() }\n"


def test_root_drops_systemtap_variables_and_uses_its_own_home() -> None:
    base = {"HOME": "/home/mallory", "SYSTEMTAP_DIR": "/home/mallory/.st", "FOO": "1"}
    env = tool_environment(base, 0)
    assert env["HOME"] != "/home/mallory" and "SYSTEMTAP_DIR" not in env and env["FOO"] == "1"
    assert tool_environment(base, 1000) == base  # a user's own tools keep their settings


def test_a_users_stap_rc_does_not_reach_roots_compile(bpf_prefix: Prefix, tmp_path: Path) -> None:
    home = tmp_path / "mallory"
    (home / ".systemtap").mkdir(parents=True)
    # stap adds $HOME/.systemtap/rc to its options: this one would break (or
    # steer, with -I) every compile it reached.
    (home / ".systemtap" / "rc").write_text("--no-such-option-from-rc\n")
    bpf_prefix.add_script("alpha", TICK, options="--runtime=bpf")
    done = bpf_prefix.run(
        "compile", "-y", env={"HOME": str(home), "SYSTEMTAP_TAPSET": str(tmp_path / "nowhere")}
    )
    assert done.returncode == 0, done.stderr
    assert "no-such-option" not in bpf_prefix.log()
