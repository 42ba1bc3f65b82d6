"""The wire format: round trips and what a decoder refuses."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stapinit.protocol import (
    MAX_MODULE_BYTES,
    PRIVILEGES,
    CompileRequest,
    CompileResponse,
    Module,
    Privilege,
    ProtocolError,
    ServerInfo,
    Tapset,
    check_file_name,
    check_module_name,
    check_tapset_path,
    decode_compile_request,
    decode_compile_response,
    decode_error,
    decode_server_info,
    encode_compile_request,
    encode_compile_response,
    encode_error,
    encode_server_info,
)

REQ = CompileRequest(
    script_text="probe begin { exit() }",
    script_name="hello.stp",
    release="6.1.0-56-amd64",
    arch="x86_64",
    tapsets=(Tapset("sub/lib.stp", "function f() { return 1 }"),),
    options=("-v", "arg1"),
    module_name="hello",
    privilege="stapusr",
    runtime="bpf",
)


def _wire(req: CompileRequest = REQ, **changes: Any) -> bytes:
    obj = json.loads(encode_compile_request(req))
    obj.update(changes)
    return json.dumps(obj).encode()


def test_request_round_trip_and_wire_shape() -> None:
    data = encode_compile_request(REQ)
    assert decode_compile_request(data) == REQ
    obj = json.loads(data)
    assert obj["script"] == {"name": "hello.stp", "text": REQ.script_text}
    assert obj["tapsets"] == [{"path": "sub/lib.stp", "text": "function f() { return 1 }"}]
    assert set(obj) == {
        "script",
        "eval",
        "tapsets",
        "options",
        "module_name",
        "release",
        "arch",
        "privilege",
        "runtime",
    }


def test_eval_request_has_no_name() -> None:
    req = CompileRequest(script_text="probe begin {}", release="r1", arch="x86_64", eval=True)
    assert decode_compile_request(encode_compile_request(req)) == req
    with pytest.raises(ProtocolError, match="no file name"):
        decode_compile_request(_wire(req, script={"name": "x.stp", "text": ""}))
    with pytest.raises(ProtocolError, match="needs a name"):
        decode_compile_request(_wire(req, eval=False))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"privilege": "root"}, "unknown privilege"),
        ({"runtime": "dyninst"}, "unknown runtime"),
        ({"eval": 1}, "wrong type"),
        ({"options": ["-v", 3]}, "list of strings"),
        ({"release": "../../etc"}, "invalid kernel release"),
        ({"module_name": "Evil-Name"}, "invalid module name"),
        ({"module_name": "a" * 56}, "invalid module name"),
        ({"script": {"name": "../x.stp", "text": ""}}, "unsafe script name"),
        ({"script": {"name": "-o.stp", "text": ""}}, "unsafe script name"),
        ({"tapsets": [{"path": "/etc/passwd", "text": ""}]}, "unsafe tapset path"),
        ({"tapsets": [{"path": "a/../../b.stp", "text": ""}]}, "unsafe tapset path"),
        ({"tapsets": [{"path": "a.stp", "text": ""}] * 2}, "given twice"),
        ({"tapsets": ["a.stp"]}, "must be an object"),
        (
            {"tapsets": [{"path": "a", "text": ""}, {"path": "a/b.stp", "text": ""}]},
            "'a' is also a directory",
        ),
    ],
)
def test_bad_requests_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_compile_request(_wire(**changes))


def test_missing_fields_and_non_json() -> None:
    obj = json.loads(_wire())
    del obj["release"]
    with pytest.raises(ProtocolError, match="missing field 'release'"):
        decode_compile_request(json.dumps(obj).encode())
    for junk in (b"\xff\xfe", b"[1, 2]", b"{"):
        with pytest.raises(ProtocolError):
            decode_compile_request(junk)


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ProtocolError):
        encode_compile_request(CompileRequest("x", "r", "a", script_name="a/b.stp"))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", ".hidden", "-rf", "a\0b", "x" * 256])
def test_unsafe_file_names(name: str) -> None:
    with pytest.raises(ProtocolError):
        check_file_name(name, "name")


def test_safe_names_pass() -> None:
    assert check_file_name("my script.stp", "name") == "my script.stp"
    assert check_tapset_path("a/b/c.stp") == "a/b/c.stp"
    assert check_module_name("stap_1234") == "stap_1234"


def test_response_round_trip() -> None:
    resp = CompileResponse(
        0, "hello.bo\n", "WARNING: x\n", Module("hello.bo", b"\0\1\2"), b"{}", cached=True
    )
    assert decode_compile_response(encode_compile_response(resp)) == resp
    failed = CompileResponse(1, "", "semantic error\n")
    assert decode_compile_response(encode_compile_response(failed)) == failed


def test_response_with_unsafe_module_name_is_refused() -> None:
    obj = json.loads(encode_compile_response(CompileResponse(0, "", "", Module("a.bo", b"x"))))
    obj["module"]["name"] = "../../.bashrc"
    with pytest.raises(ProtocolError, match="unsafe module file name"):
        decode_compile_response(json.dumps(obj).encode())
    obj["module"] = {"name": "a.bo", "data": "not base64!"}
    with pytest.raises(ProtocolError, match="base64"):
        decode_compile_response(json.dumps(obj).encode())


def test_server_info_round_trip() -> None:
    info = ServerInfo("0.3.0", "4.8/0.188", "x86_64", ("6.1.0",), "SHA256:" + "0" * 64)
    data = encode_server_info(info)
    assert json.loads(data)["server"] == "stap-server"
    assert decode_server_info(data) == info


def test_errors_are_one_line() -> None:
    assert decode_error(encode_error("bad\nthing  here")) == "bad thing here"
    assert decode_error(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert decode_error(b"") == "(empty error body)"


_text = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]))
_name = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.+ -]{0,30}", fullmatch=True)


@given(
    text=_text,
    name=_name,
    options=st.lists(_text, max_size=5),
    tapsets=st.dictionaries(_name, _text, max_size=3),
    privilege=st.sampled_from(PRIVILEGES),
)
def test_any_valid_request_round_trips(
    text: str, name: str, options: list[str], tapsets: dict[str, str], privilege: Privilege
) -> None:
    req = CompileRequest(
        script_text=text,
        script_name=name,
        release="6.1.0-56-amd64",
        arch="x86_64",
        options=tuple(options),
        tapsets=tuple(Tapset(p, t) for p, t in tapsets.items()),
        privilege=privilege,
    )
    assert decode_compile_request(encode_compile_request(req)) == req


@given(data=st.binary(max_size=200))
def test_decoder_never_crashes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_compile_request(data)


# --- every decoder of untrusted bytes fails cleanly --------------------------------------
# The server decodes requests from anyone on the network; the client decodes what a
# server (perhaps not the one it meant to reach) answers.  Every failure must be a
# ProtocolError (a one-line refusal), never another exception.

_DECODERS = [decode_compile_request, decode_compile_response, decode_server_info]

# JSON values of every type, nested, with the field names the decoders look for.
_FIELDS = st.sampled_from(
    [
        "script", "name", "text", "eval", "tapsets", "path", "options", "module_name",
        "release", "arch", "privilege", "runtime", "status", "stdout", "stderr", "module",
        "data", "signature", "cached", "server", "version", "stap_version", "releases",
        "fingerprint", "error",
    ]
)  # fmt: skip
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.sampled_from(["stapusr", "stapdev", "kmod", "bpf", "x86_64", "6.1.0", "a.stp", "QUJD"])
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_FIELDS, inner, max_size=6),
    max_leaves=20,
)


def _refuses_cleanly(data: bytes) -> None:
    for decode in _DECODERS:
        with contextlib.suppress(ProtocolError):
            decode(data)
    assert isinstance(decode_error(data), str)


@given(data=st.binary(max_size=400))
def test_decoders_refuse_any_bytes_cleanly(data: bytes) -> None:
    _refuses_cleanly(data)


@given(obj=st.dictionaries(_FIELDS, _JSON, max_size=12))
def test_decoders_refuse_any_json_shape_cleanly(obj: dict[str, Any]) -> None:
    _refuses_cleanly(json.dumps(obj).encode())


@given(
    field=st.sampled_from(["script", "tapsets", "options", "release", "status", "module"]),
    value=_JSON,
)
def test_one_wrong_field_in_a_valid_message_is_refused_cleanly(field: str, value: Any) -> None:
    good = {
        **json.loads(encode_compile_request(REQ)),
        **json.loads(encode_compile_response(CompileResponse(0, "", "", Module("a.ko", b"x")))),
    }
    good[field] = value
    _refuses_cleanly(json.dumps(good).encode())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"status": ' + b"9" * 5000 + b"}", "more than 20 digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 8 levels"),
        (b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper than 8 levels"),
        (b'{"a":' + b"[" * 50 + b"]" * 50 + b"}", "nested deeper than 8 levels"),
        (b'{"script": {"name": "\\ud800", "text": ""}}', "not valid Unicode"),
        (b'{"\\udfff": 1}', "not valid Unicode"),
        (b'{"status": NaN}', "NaN is not a JSON number"),
        (b'{"status": -Infinity}', "Infinity is not a JSON number"),
        (b"\xff\xfe{}", "not UTF-8 text"),
        (b"", "not JSON"),
    ],
)
def test_hostile_json_is_a_one_line_refusal(data: bytes, message: str) -> None:
    for decode in _DECODERS:
        with pytest.raises(ProtocolError) as err:
            decode(data)
        assert message in str(err.value)
        assert "\n" not in str(err.value)


def test_response_status_is_an_exit_status() -> None:
    wire = json.loads(encode_compile_response(CompileResponse(0, "", "")))
    for status in (-1, 256, 10**19):
        wire["status"] = status
        with pytest.raises(ProtocolError, match="is not an exit status"):
            decode_compile_response(json.dumps(wire).encode())


def test_server_info_names_releases_and_arch_safely() -> None:
    info = ServerInfo("1", "4.8", "x86_64", ("6.1.0",), "SHA256:00")
    wire = json.loads(encode_server_info(info))
    wire["releases"] = ["../../etc"]
    with pytest.raises(ProtocolError, match="invalid kernel release"):
        decode_server_info(json.dumps(wire).encode())


def test_response_module_size_is_bounded_before_decoding() -> None:
    wire = json.loads(encode_compile_response(CompileResponse(0, "", "", Module("a.ko", b"x"))))
    wire["module"]["data"] = "A" * (MAX_MODULE_BYTES // 3 * 4 + 8)
    with pytest.raises(ProtocolError, match="module larger than"):
        decode_compile_response(json.dumps(wire).encode())
