"""The signed manifest covers the runtime and the compile options too."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from stapinit.trust.signing import FORMAT, SignatureError, sign_module, verify_module
from tests.trust.signers import make_signer

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
MODULE = b"\x7fELF module bytes"
SOURCE = "ab" * 32
KEY, CERT = make_signer(NOW - dt.timedelta(days=1), NOW + dt.timedelta(days=30))


def sgn(name: str = "hello.ko", **kw: Any) -> bytes:
    kw.setdefault("source", SOURCE)
    return sign_module(KEY, CERT, MODULE, name, "6.1.0", "x86_64", "stapdev", **kw)


def test_options_and_runtime_are_signed_as_given() -> None:
    manifest = verify_module(sgn(options=["-w", "-G", "x=1"], runtime="kmod"), MODULE, [CERT])
    assert (manifest.runtime, manifest.options) == ("kmod", ("-w", "-G", "x=1"))
    assert json.loads(sgn())["format"] == FORMAT


def test_the_runtime_defaults_to_what_the_suffix_names() -> None:
    assert verify_module(sgn("hello.bo"), MODULE, [CERT]).runtime == "bpf"
    assert verify_module(sgn("hello.ko"), MODULE, [CERT]).runtime == "kmod"
    with pytest.raises(ValueError, match="not a module file name"):
        sgn("hello.txt")


@pytest.mark.parametrize(
    ("field", "value"),
    [("options", ["-w", "-g"]), ("options", []), ("runtime", "bpf"), ("source", "cd" * 32)],
)
def test_changing_what_was_signed_breaks_the_signature(field: str, value: Any) -> None:
    doc = json.loads(sgn(options=["-w"]))
    doc["manifest"][field] = value
    with pytest.raises(SignatureError) as info:
        verify_module(json.dumps(doc).encode(), MODULE, [CERT])
    assert info.value.reason == "bad-signature"


@pytest.mark.parametrize(
    ("field", "value"),
    [("options", "-w"), ("options", ["-w", 1]), ("runtime", None), ("options", None)],
)
def test_fields_of_the_wrong_type_are_malformed(field: str, value: Any) -> None:
    doc = json.loads(sgn(options=["-w"]))
    doc["manifest"][field] = value
    with pytest.raises(SignatureError, match="malformed signature file") as info:
        verify_module(json.dumps(doc).encode(), MODULE, [CERT])
    assert info.value.reason == "malformed"


def test_a_signature_of_the_first_format_is_malformed() -> None:
    doc = json.loads(sgn())
    doc["format"] = "stap-module-signature/1"
    del doc["manifest"]["options"], doc["manifest"]["runtime"], doc["manifest"]["source"]
    with pytest.raises(SignatureError, match="not stap-module-signature/3"):
        verify_module(json.dumps(doc).encode(), MODULE, [CERT])


def test_the_source_is_signed_as_given() -> None:
    assert verify_module(sgn(), MODULE, [CERT]).source == SOURCE


def test_a_signature_of_the_second_format_without_a_source_is_malformed() -> None:
    # Format /2 bound no script text: any client could have had it made.
    doc = json.loads(sgn())
    doc["format"] = "stap-module-signature/2"
    del doc["manifest"]["source"]
    with pytest.raises(SignatureError, match="not stap-module-signature/3"):
        verify_module(json.dumps(doc).encode(), MODULE, [CERT])


def test_a_third_format_signature_without_a_source_is_malformed() -> None:
    doc = json.loads(sgn())
    del doc["manifest"]["source"]
    with pytest.raises(SignatureError, match="manifest fields missing"):
        verify_module(json.dumps(doc).encode(), MODULE, [CERT])


@pytest.mark.parametrize(
    "hostile",
    [
        b'{"format": ' + b"9" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe not utf-8",
        b"{}" + b" " * (128 * 1024),
    ],
)
def test_a_hostile_signature_file_is_a_clean_refusal(hostile: bytes) -> None:
    with pytest.raises(SignatureError, match="malformed signature file"):
        verify_module(hostile, MODULE, [CERT])
