"""What a module signature's ``source`` covers: the script and its ``-I`` tapsets."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapinit.protocol import Tapset, source_digest

SCRIPT = b'probe timer.ms(100) { printf("%d\\n", pid()) }\n'


def test_without_tapsets_it_is_the_scripts_sha256() -> None:
    # What the .opts record holds and what servers signed before tapsets counted.
    assert source_digest(SCRIPT, ()) == hashlib.sha256(SCRIPT).hexdigest()


def test_any_tapset_changes_it() -> None:
    alone = source_digest(SCRIPT, ())
    one = source_digest(SCRIPT, (Tapset("lib.stp", "function f() { }\n"),))
    edited = source_digest(SCRIPT, (Tapset("lib.stp", "function f() { }\n\n"),))
    moved = source_digest(SCRIPT, (Tapset("sub/lib.stp", "function f() { }\n"),))
    empty = source_digest(SCRIPT, (Tapset("lib.stp", ""),))
    assert len({alone, one, edited, moved, empty}) == 5


def test_the_order_tapsets_are_listed_in_does_not_matter() -> None:
    a, b, c = Tapset("a.stp", "x"), Tapset("b/c.stp", "y"), Tapset("c.stp", "z")
    assert source_digest(SCRIPT, (a, b, c)) == source_digest(SCRIPT, (c, a, b))


def test_splits_between_path_and_text_do_not_collide() -> None:
    cases = [
        (b"a", (Tapset("b", "c"),)),
        (b"a", (Tapset("bc", ""),)),
        (b"a", (Tapset("b", ""), Tapset("c", ""))),
        (b"a", (Tapset("b\0c", ""),)),
        (b"ab", (Tapset("c", ""),)),
        (b"", (Tapset("a", "bc"),)),
    ]
    assert len({source_digest(script, tapsets) for script, tapsets in cases}) == len(cases)


def test_no_script_a_request_can_carry_has_the_digest_of_one_with_tapsets() -> None:
    # The encoding hashed begins with 0xff, a byte UTF-8 text never holds: the
    # server cannot be made to sign a script's plain digest equal to it.
    tapsets = (Tapset("lib.stp", "x"),)
    plain = hashlib.sha256(SCRIPT).hexdigest().encode()
    encoding = b"\xffstap-source-with-tapsets/1\0" + plain + (7).to_bytes(8, "big") + b"lib.stp"
    encoding += hashlib.sha256(b"x").digest()
    assert hashlib.sha256(encoding).hexdigest() == source_digest(SCRIPT, tapsets)
    with pytest.raises(UnicodeDecodeError):
        encoding.decode("utf-8")


# A request's tapsets have distinct paths (one file each).
_tapsets = st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4)


@given(st.binary(max_size=8), _tapsets, st.binary(max_size=8), _tapsets)
def test_different_inputs_give_different_digests(
    script_a: bytes, tapsets_a: dict[str, str], script_b: bytes, tapsets_b: dict[str, str]
) -> None:
    a = source_digest(script_a, tuple(Tapset(p, t) for p, t in tapsets_a.items()))
    b = source_digest(script_b, tuple(Tapset(p, t) for p, t in reversed(tapsets_b.items())))
    assert (a == b) == ((script_a, tapsets_a) == (script_b, tapsets_b))
