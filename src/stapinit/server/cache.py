"""Content-addressed cache of compile results (module, signature, stap's output).

The key is the SHA-256 of everything that determines the result: script, tapsets,
checked options and the options as the client spelled them (the signed manifest
names those that shape the module), module name, release, architecture, privilege, runtime, stap's
version and the signer's fingerprint (every result is signed).  Only successful
compiles are stored.  An entry is a directory written in full under a temporary
name and renamed into place, so readers never see half an entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stapinit.protocol import CompileRequest, Module, check_file_name
from stapinit.server.policy import ParsedOptions

# /3: results of /2 carry signatures of format /2, which no host accepts now.
_FORMAT = "stap-server-cache/3"


def cache_key(
    req: CompileRequest,
    parsed: ParsedOptions,
    stap_version: str,
    signer_fingerprint: str | None,
) -> str:
    """Hex SHA-256 naming the result of compiling ``req`` (pure)."""
    material = {
        "format": _FORMAT,
        "script": [req.script_name, req.script_text, req.eval],
        "tapsets": sorted([t.path, t.text] for t in req.tapsets),
        "options": list(parsed.options),
        "requested_options": list(req.options),
        "args": list(parsed.script_args),
        "runtime": parsed.runtime,
        "module_name": req.module_name,
        "release": req.release,
        "arch": req.arch,
        "privilege": req.privilege,
        "stap": stap_version,
        "signer": signer_fingerprint,
    }
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedResult:
    """What is stored for one successful compile."""

    stdout: str
    stderr: str
    module: Module
    signature: bytes | None


class CompileCache:
    """Entries under ``root/KEY[:2]/KEY/``, pruned oldest-used first beyond ``max_bytes``."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._prune_lock = threading.Lock()
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> CachedResult | None:
        """The stored result for ``key``, or None (also for a damaged entry)."""
        entry = self._entry(key)
        try:
            meta: Any = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
            name = check_file_name(meta["module_name"], "module file name")
            data = (entry / "module").read_bytes()
            signature = (entry / "signature").read_bytes() if meta["signed"] else None
            if hashlib.sha256(data).hexdigest() != meta["module_sha256"]:
                return None
            os.utime(entry / "meta.json")  # recently used: pruned last
            return CachedResult(meta["stdout"], meta["stderr"], Module(name, data), signature)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, result: CachedResult) -> None:
        """Store ``result`` under ``key`` (a no-op when another thread got there first)."""
        if self.max_bytes <= 0:
            return
        final = self._entry(key)
        final.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            (tmp / "module").write_bytes(result.module.data)
            if result.signature is not None:
                (tmp / "signature").write_bytes(result.signature)
            meta = {
                "module_name": result.module.name,
                "module_sha256": hashlib.sha256(result.module.data).hexdigest(),
                "signed": result.signature is not None,
                "stdout": result.stdout,
                "stderr": result.stderr,
            }
            (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
            # Fails when the entry exists (same key, same content: keep either); the
            # cache is best effort, so a full disk only costs a later recompile.
            with contextlib.suppress(OSError):
                tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.prune()

    def prune(self) -> None:
        """Remove least recently used entries until the cache fits ``max_bytes``."""
        with self._prune_lock:
            entries: list[tuple[float, int, Path]] = []
            total = 0
            for meta in self.root.glob("??/*/meta.json"):
                entry = meta.parent
                try:
                    size = sum(f.stat().st_size for f in entry.iterdir())
                    entries.append((meta.stat().st_mtime, size, entry))
                except OSError:
                    continue
                total += size
            entries.sort()
            for _, size, entry in entries:
                if total <= self.max_bytes:
                    break
                shutil.rmtree(entry, ignore_errors=True)
                total -= size
