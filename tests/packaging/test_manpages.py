"""The man pages in doc/: each renders cleanly and documents every option of its command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.packaging.conftest import REPO

PAGES = sorted((REPO / "doc").glob("*.[18]"))
#: A command-line option: a dash or two and a letter, not inside a word such as
#: "stap-server" or "try-restart".
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")
RENDER_ENV = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "200", "MAN_KEEP_FORMATTING": ""}


def entry_points() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    scripts: dict[str, str] = project["scripts"]
    return scripts


def render(page: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["man", "--warnings", "-l", str(page)], capture_output=True, text=True, env=RENDER_ENV
    )


def plain(text: str) -> str:
    """Rendered text on one line, with groff's hyphens and minus signs as ASCII."""
    return re.sub(r"\s+", " ", text).replace("\u2010", "-").replace("\u2212", "-")


def help_options(command: str) -> set[str]:
    """The options ``command --help`` lists, run from this source tree."""
    module, _, function = entry_points()[command].partition(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}(['--help']))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "80"},
    )
    assert done.returncode == 0, (command, done.stderr)
    assert done.stdout.startswith(f"usage: {command} "), (command, done.stdout)
    return set(OPTION.findall(done.stdout))


def test_every_command_has_a_page() -> None:
    assert {page.stem for page in PAGES} == set(entry_points())


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_page_renders_without_warnings(page: Path) -> None:
    done = render(page)
    assert (done.returncode, done.stderr) == (0, "")
    text = plain(done.stdout)
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "SEE ALSO"):
        assert f" {section} " in f" {text} ", section
    assert f"{page.stem} - " in text  # the NAME line whatis and apropos read


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_page_mentions_every_option_of_its_command(page: Path) -> None:
    options = help_options(page.stem)
    assert options, page.stem
    text = plain(render(page).stdout)
    missing = {
        option
        for option in options
        if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text)
    }
    assert not missing, missing


CONFIG_KEYS = {
    "stap-server.8": ("data/server/stap-server.conf", r"^#?\s*([A-Z][A-Z_]*)="),
    "stap-client.1": ("data/client/client.conf", r"^#?\s*([a-z][a-z_]*)\s*="),
    "stap-loader.8": ("data/loader/stap-loader.conf", r"^#?\s*([a-z][a-z_]*)\s*="),
}


@pytest.mark.parametrize("name", sorted(CONFIG_KEYS))
def test_page_documents_every_setting_of_its_config_file(name: str) -> None:
    config, pattern = CONFIG_KEYS[name]
    keys = set(re.findall(pattern, (REPO / config).read_text(), re.MULTILINE))
    assert keys
    text = plain(render(REPO / "doc" / name).stdout)
    missing = {key for key in keys if not re.search(rf"(?<![\w-]){key}(?![\w-])", text)}
    assert not missing, missing
