"""Root writing into a directory someone else can write: the mode of a file is set on the
file root wrote, never on whatever a racer put at the temp file's name."""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

from stapinit.core.fsutil import atomic_copy, atomic_write, set_mode
from stapinit.initscript.packing import _write_output

DATA = b"x" * (1 << 20)  # big enough that the racer finds the temp file often


class Racer(threading.Thread):
    """chmod_racer.py of the red-team report: renames each temp file beside NAME away and
    plants a symlink to ``target`` in its place, until stopped."""

    def __init__(self, directory: Path, name: str, target: Path) -> None:
        super().__init__(daemon=True)
        self.directory, self.target = directory, target
        self.pattern = re.compile(r"^\." + re.escape(name) + r"\..+\.tmp$")
        self.stop = threading.Event()
        self.swaps = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for entry in os.listdir(self.directory):
                path = self.directory / entry
                if self.pattern.match(entry) and not path.is_symlink():
                    try:
                        path.rename(self.directory / f"stolen.{self.swaps}")
                        path.symlink_to(self.target)
                        self.swaps += 1
                    except OSError:
                        pass  # root got there first: try the next one


def _pack_output(path: Path) -> None:
    def fill(handle: IO[bytes]) -> None:
        handle.write(DATA)

    _write_output(path, fill)


def _copy(path: Path) -> None:
    source = path.parent.parent / "source"
    if not source.exists():
        source.write_bytes(DATA)
    atomic_copy(source, path)


WRITERS: dict[str, Callable[[Path], None]] = {
    "atomic_write": lambda path: atomic_write(path, DATA),
    "atomic_copy": _copy,
    "pack -o": _pack_output,
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_symlink_swapped_in_for_the_temp_file_gets_no_chmod(tmp_path: Path, writer: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root's own\n")
    secret.chmod(0o600)
    users_dir = tmp_path / "users"
    users_dir.mkdir()
    users_dir.chmod(0o1777)  # anyone may create and rename their own files in it
    racer = Racer(users_dir, "out", secret)
    racer.start()
    deadline = time.monotonic() + 30
    try:
        while racer.swaps < 5 and time.monotonic() < deadline:
            # A swap also renames the planted link onto "out": pack -o refuses to replace it.
            (users_dir / "out").unlink(missing_ok=True)
            WRITERS[writer](users_dir / "out")
    finally:
        racer.stop.set()
        racer.join(10)
    assert racer.swaps >= 5, "the race was never run: the test shows nothing"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert secret.read_text() == "root's own\n"


def test_set_mode_refuses_a_symlink_and_leaves_its_target_alone(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root's own\n")
    secret.chmod(0o600)
    made = tmp_path / "made"
    made.mkdir()
    set_mode(made, 0o711)
    assert made.stat().st_mode & 0o777 == 0o711
    # What a user who can write the directory does between root's mkdir and chmod.
    made.rmdir()
    made.symlink_to(secret)
    with pytest.raises(OSError) as info:
        set_mode(made, 0o755, (os.getuid(), os.getgid()))
    assert info.value.errno == errno.ELOOP
    assert secret.stat().st_mode & 0o777 == 0o600
