"""What stap-client shows of stap's output: the module's name only once it saved one."""

from __future__ import annotations

import pytest

from stapinit.client.cli import shown_stdout


@pytest.mark.parametrize(
    ("stdout", "shown"),
    [
        ("stap_0123abcd_4567.bo\n", ""),
        ("hello.ko\n", ""),
        ("hello.ko", ""),
        ("some output\nhello.bo\n", "some output\n"),
        ("hello.bo\nmore\n", "hello.bo\nmore\n"),  # not stap's last line: not a name it printed
        ("Hello.bo\n", "Hello.bo\n"),  # not a module name stap makes
        ("dir/hello.bo\n", "dir/hello.bo\n"),
        ("hello.so\n", "hello.so\n"),
        ("", ""),
    ],
)
def test_the_module_name_stap_printed_is_never_shown(stdout: str, shown: str) -> None:
    assert shown_stdout(stdout) == shown
