"""Cache keys (pure) and the content-addressed store."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from stapinit.protocol import CompileRequest, Module, Tapset
from stapinit.server.cache import CachedResult, CompileCache, cache_key
from stapinit.server.policy import ParsedOptions

REQ = CompileRequest(
    script_text="probe begin { exit() }", script_name="a.stp", release="6.1.0", arch="x86_64"
)
PARSED = ParsedOptions((), (), "bpf", ())
STAP = "Systemtap translator/driver (version 4.8/0.188)"


def _key(req: CompileRequest = REQ, parsed: ParsedOptions = PARSED, **kw: str) -> str:
    return cache_key(req, parsed, kw.get("stap", STAP), kw.get("signer", "SHA256:aa"))


def test_key_is_stable_and_hex() -> None:
    assert _key() == _key()
    assert len(_key()) == 64
    int(_key(), 16)


def test_key_changes_with_everything_that_shapes_the_result() -> None:
    variants = [
        dataclasses.replace(REQ, script_text=REQ.script_text + " "),
        dataclasses.replace(REQ, script_name="b.stp"),
        dataclasses.replace(REQ, tapsets=(Tapset("t.stp", ""),)),
        dataclasses.replace(REQ, module_name="m"),
        dataclasses.replace(REQ, release="6.2.0"),
        dataclasses.replace(REQ, arch="aarch64"),
        dataclasses.replace(REQ, privilege="stapusr"),
    ]
    keys = {_key(v) for v in variants}
    keys.add(_key(parsed=ParsedOptions(("-v",), (), "bpf", ())))
    keys.add(_key(parsed=ParsedOptions((), ("arg",), "bpf", ("arg",))))
    keys.add(_key(parsed=ParsedOptions((), (), "kmod", ())))
    keys.add(_key(stap="Systemtap translator/driver (version 4.9/0.190)"))
    keys.add(_key())
    assert len(keys) == len(variants) + 5


def test_every_result_is_signed_so_the_signer_and_the_spelling_of_options_matter() -> None:
    assert _key(signer="SHA256:aa") != _key(signer="SHA256:bb")
    usr = dataclasses.replace(REQ, privilege="stapusr")
    assert _key(usr, signer="SHA256:aa") != _key(usr, signer="SHA256:bb")
    # "-ub" and "-u -b" compile alike, but the signed manifest names the options as asked.
    bundled = dataclasses.replace(REQ, options=("-ub",))
    spelled = dataclasses.replace(REQ, options=("-u", "-b"))
    assert _key(bundled, ParsedOptions(("-u", "-b"), (), "bpf", ("-ub",))) != _key(
        spelled, ParsedOptions(("-u", "-b"), (), "bpf", ("-u", "-b"))
    )


def test_tapset_order_does_not_matter() -> None:
    a, b = Tapset("a.stp", "1"), Tapset("b.stp", "2")
    assert _key(dataclasses.replace(REQ, tapsets=(a, b))) == _key(
        dataclasses.replace(REQ, tapsets=(b, a))
    )


RESULT = CachedResult("m.bo\n", "WARNING\n", Module("m.bo", b"\x7fELF..."), b'{"sig":1}')


def test_store_and_fetch(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path / "cache", 1 << 20)
    assert cache.get("ab" * 32) is None
    cache.put("ab" * 32, RESULT)
    assert cache.get("ab" * 32) == RESULT
    cache.put("ab" * 32, RESULT)  # again: harmless
    unsigned = dataclasses.replace(RESULT, signature=None)
    cache.put("cd" * 32, unsigned)
    assert cache.get("cd" * 32) == unsigned
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


def test_damaged_entry_is_a_miss(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path, 1 << 20)
    key = "ef" * 32
    cache.put(key, RESULT)
    (tmp_path / key[:2] / key / "module").write_bytes(b"tampered")
    assert cache.get(key) is None
    (tmp_path / key[:2] / key / "meta.json").write_text("{not json")
    assert cache.get(key) is None


def test_prune_drops_least_recently_used(tmp_path: Path) -> None:
    big = dataclasses.replace(RESULT, module=Module("m.bo", b"x" * 4000))
    cache = CompileCache(tmp_path, 9_000)  # room for two entries
    keys = [f"{i:02x}" * 32 for i in range(2)]
    for age, key in enumerate(keys):
        cache.put(key, big)
        meta = tmp_path / key[:2] / key / "meta.json"
        os.utime(meta, (1000 + age, 1000 + age))
    assert cache.get(keys[0]) is not None  # used now: newest
    cache.put("ff" * 32, big)
    assert cache.get(keys[1]) is None
    assert cache.get(keys[0]) is not None
    assert cache.get("ff" * 32) is not None


def test_size_zero_stores_nothing(tmp_path: Path) -> None:
    cache = CompileCache(tmp_path, 0)
    cache.put("ab" * 32, RESULT)
    assert cache.get("ab" * 32) is None
