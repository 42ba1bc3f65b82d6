"""Kernel build trees installed on this machine (or under another root), found at run time.

Tests must not name a kernel release: Debian's header packages move on (6.1.0-56 became
6.1.0-57), and Debian 13 has other ones altogether.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_UTS_RELEASE = re.compile(r'^#define UTS_RELEASE "([^"]+)"$', re.MULTILINE)


def build_tree_release(build: Path) -> str | None:
    """The release a kernel build tree was made for, or None if it is no build tree.

    Read from ``include/generated/utsrelease.h`` (``#define UTS_RELEASE "R"``), which
    every kernel build and Debian's linux-headers packages carry; a tree also needs its
    ``.config``, which stap checks first.
    """
    try:
        if not (build / ".config").is_file():
            return None
        text = (build / "include" / "generated" / "utsrelease.h").read_text(errors="replace")
    except OSError:
        return None
    found = _UTS_RELEASE.search(text)
    return found.group(1) if found else None


def build_link_target(root: Path, release: str) -> Path:
    """Where ``ROOT/lib/modules/RELEASE/build`` leads, its symlinks taken inside ``root``.

    Debian's header packages make ``build`` a symlink, absolute (Debian 12) or relative
    (Debian 13); an absolute one means ``root``'s own ``/usr/src``, not this host's.
    """
    build = root / "lib" / "modules" / release / "build"
    if root != Path("/") and build.is_symlink():
        target = Path(os.readlink(build))
        if target.is_absolute():
            return root / target.relative_to("/")
    return build.resolve()


def own_build_releases(root: Path = Path("/")) -> list[str]:
    """Releases R whose ``ROOT/lib/modules/R/build`` is R's own build tree, sorted.

    The running kernel here may borrow another release's headers through its build link
    (dev/setup-host makes one); such a release is left out, since a module compiled
    against it is really for the headers' release.
    """
    try:
        entries = sorted(os.listdir(root / "lib" / "modules"))
    except OSError:
        return []
    return [r for r in entries if build_tree_release(build_link_target(root, r)) == r]
