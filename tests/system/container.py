"""A Debian container booted with systemd as its PID 1, driven from outside.

The cached root (:mod:`tests.system.rootfs`) is the lower layer of an overlay
mount whose upper layer is this run's own directory, so a run changes only its
copy. ``systemd-nspawn -b`` boots it; commands run inside through
``nsenter -t PID -a``, PID being the container's systemd (nspawn's child).
Every wait is bounded; :meth:`Container.destroy` powers the container off, kills
it if it will not stop, and unmounts the overlay, whatever state it is in.

Flags (../shared/notes/real-systemtap-here.md): ``--register=no --keep-unit``
because the host has no systemd/machined to register with, and
``--system-call-filter='bpf perf_event_open'`` because nspawn's seccomp policy
otherwise blocks the BPF runtime.

With ``--keep-unit`` nspawn splits the cgroup it runs in into ``supervisor``
and ``payload`` (the container's systemd manages ``payload``). Two containers
started from one cgroup would share, and fight over, that tree, so each is
started in a cgroup of its own (:class:`OwnCgroup`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

NSPAWN = [
    "systemd-nspawn",
    "--boot",
    "--register=no",
    "--keep-unit",
    "--system-call-filter=bpf perf_event_open",
    # Only a loopback of its own: its services' ports clash with nothing on the host.
    "--private-network",
]
#: The PATH of commands run inside (nsenter passes the caller's environment on).
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 90.0  # seconds until systemd reports the boot finished
SHUTDOWN_TIMEOUT = 60.0  # seconds for a clean power-off before the container is killed
COMMAND_TIMEOUT = 180.0  # seconds any one command inside may take


class ContainerError(Exception):
    """The container did not boot or answer in time; str() has the console's tail."""


class OwnCgroup:
    """A new cgroup under the caller's, in each hierarchy systemd uses (v2, and v1's name=systemd).

    :meth:`command` runs a command there.
    """

    def __init__(self, name: str) -> None:
        self.directories: list[Path] = []
        mounts: dict[str, Path] = {}
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            separator = fields.index("-")
            fstype, options = fields[separator + 1], fields[separator + 3]
            if fstype == "cgroup2":
                mounts.setdefault("", Path(fields[4]))
            elif fstype == "cgroup" and "name=systemd" in options.split(","):
                mounts.setdefault("name=systemd", Path(fields[4]))
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers in mounts:
                directory = mounts[controllers] / path.lstrip("/") / name
                directory.mkdir(exist_ok=True)
                self.directories.append(directory)

    def command(self, argv: list[str]) -> list[str]:
        """``argv``, run by a shell that first moves itself into these cgroups."""
        enter = (
            'while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs"; shift; done; shift; exec "$@"'
        )
        return ["sh", "-c", enter, "sh", *(str(d) for d in self.directories), "--", *argv]

    def remove(self, timeout: float = 5.0) -> None:
        """Remove the cgroups (and what systemd left in them), deepest first.

        The kernel frees a cgroup a moment after its last process exits
        (rmdir fails with EBUSY until then), so this retries for ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            for top in self.directories:
                inner = [p for p in top.rglob("*") if p.is_dir()]
                for directory in [*sorted(inner, key=lambda p: len(p.parts), reverse=True), top]:
                    with contextlib.suppress(OSError):
                        directory.rmdir()
            if not any(top.exists() for top in self.directories) or time.monotonic() > deadline:
                return
            time.sleep(0.1)


class Container:
    """One overlay of the cached root, booted and powered off on demand."""

    def __init__(self, image: Path, workdir: Path) -> None:
        self.image = image
        self.workdir = workdir
        self.root = workdir / "root"  # the overlay: what the container sees as /
        self.upper = workdir / "upper"
        self.console = workdir / "console.log"
        self.boots = 0
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._mounted = False
        self._cgroup: OwnCgroup | None = None
        self.pid = 0  # the container's systemd, as the host sees it

    # -- the overlay ---------------------------------------------------------

    def mount(self) -> None:
        """Mount the overlay: the cache below (never written), this run's upper layer above."""
        work = self.workdir / "work"
        for directory in (self.root, self.upper, work):
            directory.mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={self.image},upperdir={self.upper},workdir={work}"
        done = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise ContainerError(f"cannot mount the overlay on {self.root}: {done.stderr.strip()}")
        self._mounted = True

    def path(self, inside: str) -> Path:
        """Where a path of the container's file system is on the host (not /run, /tmp)."""
        return self.root / inside.lstrip("/")

    # -- booting and stopping ------------------------------------------------

    def boot(self) -> None:
        """Boot, and wait until systemd says the boot is over (running or degraded)."""
        assert self._nspawn is None, "already booted"
        self.boots += 1
        self._cgroup = OwnCgroup(f"stapinit-system-{os.getpid()}-{id(self)}")
        with self.console.open("ab") as console:
            console.write(f"\n--- boot {self.boots} ---\n".encode())
            console.flush()
            self._nspawn = subprocess.Popen(
                self._cgroup.command([*NSPAWN, "-D", str(self.root)]),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        self.pid = self._wait_for_init(deadline)
        while True:
            state = self.run(
                "systemctl", "is-system-running", "--wait", timeout=deadline - time.monotonic()
            ).stdout.strip()
            if state in ("running", "degraded"):
                return
            # "offline"/"unknown": the bus is not there yet.
            if time.monotonic() >= deadline:
                raise ContainerError(f"boot did not finish ({state}):\n{self.console_tail()}")
            time.sleep(0.2)

    def _wait_for_init(self, deadline: float) -> int:
        """nspawn's child once it has become systemd."""
        assert self._nspawn is not None
        children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise ContainerError(
                    f"systemd-nspawn exited ({self._nspawn.returncode}):\n{self.console_tail()}"
                )
            with contextlib.suppress(OSError):
                for word in children.read_text().split():
                    if Path(f"/proc/{word}/comm").read_text().strip() == "systemd":
                        return int(word)
            time.sleep(0.05)
        raise ContainerError(f"no systemd in the container:\n{self.console_tail()}")

    def poweroff(self) -> None:
        """``systemctl poweroff`` inside, and wait for nspawn to exit (bounded)."""
        nspawn = self._nspawn
        if nspawn is None:
            return
        if nspawn.poll() is None:
            self.run("systemctl", "poweroff", "--no-block", timeout=30)
        try:
            nspawn.wait(SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ContainerError(
                f"no power-off within {SHUTDOWN_TIMEOUT:g}s; killed it:\n{self.console_tail()}"
            ) from None
        self._ended()

    def reboot(self) -> None:
        """Power off and boot again on the same overlay: a reboot of this machine."""
        self.poweroff()
        self.boot()

    def kill(self) -> None:
        """Kill every process of the container (SIGKILL to its init ends its pid namespace)."""
        nspawn = self._nspawn
        if nspawn is None:
            return
        for pid in (self.pid, nspawn.pid):
            if pid and nspawn.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    nspawn.wait(10)
        self._ended()

    def _ended(self) -> None:
        self._nspawn, self.pid = None, 0
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None

    def destroy(self) -> None:
        """Power off (or kill) and unmount: nothing of this container is left running."""
        try:
            with contextlib.suppress(ContainerError, subprocess.TimeoutExpired):
                self.poweroff()
        finally:
            self.kill()
            if self._mounted:
                done = subprocess.run(["umount", str(self.root)], capture_output=True, timeout=30)
                if done.returncode != 0:
                    subprocess.run(["umount", "--lazy", str(self.root)], timeout=30)
                self._mounted = False

    @property
    def running(self) -> bool:
        return self._nspawn is not None and self._nspawn.poll() is None

    def console_tail(self, size: int = 3000) -> str:
        try:
            return self.console.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    # -- commands inside -----------------------------------------------------

    def run(
        self,
        *argv: str,
        user: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside (as root, or as ``user`` through runuser); never raises on failure.

        The environment is only PATH, a C.UTF-8 locale, no pager and no colour,
        plus ``env``.
        """
        assert self.pid, "the container is not booted"
        variables = {
            "PATH": INNER_PATH,
            "LC_ALL": "C.UTF-8",
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
            "DEBIAN_FRONTEND": "noninteractive",
            **(env or {}),
        }
        command = ["nsenter", "-t", str(self.pid), "-a", "env", "-i"]
        command += [f"{key}={value}" for key, value in variables.items()]
        if user is not None:
            command += ["runuser", "-u", user, "--"]
        try:
            return subprocess.run(
                [*command, *argv],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=max(timeout, 1.0),
            )
        except subprocess.TimeoutExpired as expired:
            raise ContainerError(f"{' '.join(argv)} took more than {timeout:g}s") from expired

    def check(self, *argv: str, user: str | None = None) -> str:
        """Run ``argv`` inside; its stdout, or ContainerError naming the failure."""
        done = self.run(*argv, user=user)
        if done.returncode != 0:
            raise ContainerError(
                f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
            )
        return done.stdout
