"""A copy of this checkout's commands that every user can run, for the tests that run
commands as other users (or that drop root's privileges).

A clone may lie where nobody but its owner can look -- a new machine's ``/root`` is mode
0700 -- and the test virtualenv, with the project installed editable, lies inside it.
So at the start of a test run (when ``tests/conftest.py`` is imported, once for all
xdist workers) the code is copied to a world-readable directory under ``/tmp``, laid
out like ``make install`` lays out the product:

* ``lib/``: the ``stapinit`` package from ``src/`` and every distribution it requires
  (``cryptography`` and what that needs), copied from this virtualenv;
* ``bin/``: one launcher per console script of the distribution, running the base
  interpreter isolated (``-I``) on ``lib/``, and ``python``, that interpreter on ``lib/``;
* ``helpers/``: test helper scripts that other users run (:data:`HELPERS`).

Its path reaches the xdist workers through :data:`ENV`; it is removed at the end of the
run.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ENV = "STAPINIT_TEST_SHARED_INSTALL"
DISTRIBUTION = "systemtap-initscript"
REPO = Path(__file__).resolve().parents[2]
HELPERS = (
    REPO / "tests" / "loader" / "probe_client.py",
    REPO / "tests" / "loader" / "hold_client.py",
)
#: The interpreter the virtualenv was made from, e.g. /usr/bin/python3.11.
BASE_PYTHON = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _required(name: str) -> list[str]:
    """Names of the distributions ``name`` needs at run time (extras left out)."""
    names = []
    for requirement in importlib.metadata.requires(name) or []:
        if "extra" in requirement.partition(";")[2]:
            continue
        found = _REQUIREMENT_NAME.match(requirement)
        if found:
            names.append(found.group(0))
    return names


def _copy_distribution(name: str, lib: Path, seen: set[str]) -> None:
    """Copy the installed files of ``name`` and what it requires into ``lib``."""
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return  # a requirement for another platform (cffi's on PyPy, say)
    for file in dist.files or []:
        source = Path(str(dist.locate_file(file)))
        if file.parts[0] == ".." or "__pycache__" in file.parts or not source.is_file():
            continue  # scripts in bin/, byte code: not needed
        target = lib / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    for required in _required(name):
        _copy_distribution(required, lib, seen)


def _launcher(module: str, function: str, lib: Path) -> str:
    return (
        f"#!{BASE_PYTHON} -I\n"
        "import sys\n\n"
        f"sys.path.insert(0, {str(lib)!r})\n"
        f"from {module} import {function}  # noqa: E402\n\n"
        f"sys.exit({function}())\n"
    )


def build() -> Path:
    """Make the copy under /tmp; returns its directory."""
    root = Path(tempfile.mkdtemp(prefix="stapinit-shared-install-", dir="/tmp"))
    lib, bin_dir, helpers = root / "lib", root / "bin", root / "helpers"
    for directory in (lib, bin_dir, helpers):
        directory.mkdir()
    seen = {DISTRIBUTION}
    for required in _required(DISTRIBUTION):
        _copy_distribution(required, lib, seen)
    # The package itself from the source tree (the editable install points there).
    shutil.copytree(
        REPO / "src" / "stapinit", lib / "stapinit", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = importlib.metadata.distribution(DISTRIBUTION)
    for entry in dist.entry_points:
        if entry.group == "console_scripts":
            module, _, function = entry.value.partition(":")
            (bin_dir / entry.name).write_text(_launcher(module.strip(), function.strip(), lib))
    (bin_dir / "python").write_text(f'#!/bin/sh\nPYTHONPATH={lib} exec {BASE_PYTHON} "$@"\n')
    for helper in HELPERS:
        shutil.copy(helper, helpers / helper.name)
    for path in (root, *root.rglob("*")):
        executable = path.is_dir() or path.parent == bin_dir
        path.chmod(0o755 if executable else 0o644)
    return root


def remove(root: Path) -> None:
    """Remove a copy made by :func:`build`."""
    shutil.rmtree(root, ignore_errors=True)


def root() -> Path:
    """The copy made for this test run."""
    value = os.environ.get(ENV)
    if not value:
        raise RuntimeError(f"{ENV} is not set: the tests' pytest_configure makes the copy")
    return Path(value)


def bin_dir() -> Path:
    """Where the copy's commands are (``systemtap-service``, ``stap-client``, ``python``...)."""
    return root() / "bin"


def helper(name: str) -> Path:
    """A copied helper script, by file name."""
    return root() / "helpers" / name
