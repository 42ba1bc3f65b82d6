"""Compiling ahead for every installed kernel: ``compile --all-kernels`` (spec §5.7).

After a kernel update nothing should have to compile at boot. A release
counts as installed for compiling when ``MODULES_DIR/<release>/build`` is a
kernel build tree, which is what ``stap -r <release>`` itself looks for. With
``COMPILE_SERVER`` set the server compiles, so every installed kernel counts,
build tree or not. An installed kernel that nothing can compile for, and for
which caches are missing, is reported loudly: the boot scripts would not
start on it.
"""

from __future__ import annotations

from pathlib import Path

from stapinit.core.lsb import EXIT_FAILED, EXIT_OK
from stapinit.initscript.cache import target_kernel
from stapinit.initscript.commands import CommandError, Initscript, Request
from stapinit.initscript.scripts import cache_dir

MODULES_DIR = Path("/lib/modules")


def has_build_tree(modules_dir: Path, release: str) -> bool:
    """True when ``release`` has a build tree stap can use (its ``.config`` is there)."""
    return (modules_dir / release / "build" / ".config").is_file()


def releases_with_build_tree(modules_dir: Path = MODULES_DIR) -> list[str]:
    """The releases under ``modules_dir`` that have a build tree, sorted by name."""
    try:
        entries = sorted(entry.name for entry in modules_dir.iterdir() if entry.is_dir())
    except OSError:
        return []
    return [release for release in entries if has_build_tree(modules_dir, release)]


def installed_releases(modules_dir: Path = MODULES_DIR) -> list[str]:
    """The releases under ``modules_dir`` with a build tree or modules, sorted by name."""
    try:
        entries = sorted(entry.name for entry in modules_dir.iterdir() if entry.is_dir())
    except OSError:
        return []
    return [
        release
        for release in entries
        if has_build_tree(modules_dir, release)
        or (modules_dir / release / "modules.order").is_file()
        or (modules_dir / release / "kernel").is_dir()
    ]


def compile_all_kernels(
    initscript: Initscript, request: Request, modules_dir: Path = MODULES_DIR
) -> int:
    """Compile the named (or all) scripts for every release with a build tree.

    Valid caches are left alone, so running this again (as the kernel hook
    does on every kernel install) only compiles what changed. Cache-only
    scripts have no ``.stp`` to compile and are skipped. With
    ``COMPILE_SERVER`` every installed release is compiled for; without, an
    installed release without a build tree whose caches are missing fails the
    command with a warning that the boot scripts will not start on it.
    """
    with_tree = releases_with_build_tree(modules_dir)
    servers = bool(initscript.settings.compile_servers)
    releases = installed_releases(modules_dir) if servers else with_tree
    code = EXIT_OK if servers else _unprepared(initscript, request, modules_dir, with_tree)
    if not releases:
        raise CommandError(f"no kernel release in {modules_dir} has a build tree (build/.config)")
    seen_any = False
    for release in releases:
        kernel = target_kernel(release)
        scripts = initscript.scripts(release)
        names = initscript.select(request, scripts)[0] if request.scripts else sorted(scripts)
        compilable = [scripts[name] for name in names if scripts[name].source is not None]
        seen_any = seen_any or bool(compilable)
        stale = initscript.stale_scripts(
            compilable, kernel, cache_dir(initscript.settings, release)
        )
        for script in compilable:
            if script.name not in stale:
                print(f"{script.name} is up to date for {release}", file=initscript.log.out)
        if not stale:
            continue
        outcome = initscript.compile(Request(tuple(stale), release, assume_yes=True))
        if code == EXIT_OK:
            code = outcome
    if not seen_any:
        initscript.log.warning(f"no scripts to compile in {initscript.settings.script_path}")
    return code


def _unprepared(
    initscript: Initscript, request: Request, modules_dir: Path, with_tree: list[str]
) -> int:
    """Warn about installed releases that nothing can compile for and that lack caches."""
    code = EXIT_OK
    for release in installed_releases(modules_dir):
        if release in with_tree:
            continue
        scripts = initscript.scripts(release)
        names = initscript.select(request, scripts)[0] if request.scripts else sorted(scripts)
        chosen = [scripts[name] for name in names]
        stale = initscript.stale_scripts(
            chosen, target_kernel(release), cache_dir(initscript.settings, release)
        )
        if stale:
            initscript.log.warning(
                f"kernel {release} has no build tree and COMPILE_SERVER is not set: the boot "
                f"scripts {' '.join(stale)} will not start on {release} (install its headers, "
                "set COMPILE_SERVER, or unpack caches built elsewhere)"
            )
            code = EXIT_FAILED
    return code
