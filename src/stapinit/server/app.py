"""What the server does with a request, independent of HTTP and TLS.

:class:`CompileService` turns a request body into an :class:`Outcome` (HTTP status,
JSON body, extra headers, fields for the request log): decode, apply the policy,
answer from the cache, else wait for a compile slot, compile, sign, store.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

from stapinit.protocol import (
    CompileRequest,
    CompileResponse,
    ProtocolError,
    ServerInfo,
    decode_compile_request,
    encode_compile_response,
    encode_error,
    encode_server_info,
)
from stapinit.server.cache import CachedResult, CompileCache, cache_key
from stapinit.server.compiler import Compiler, CompileResult
from stapinit.server.identity import Identity
from stapinit.server.policy import PolicyError, check_request
from stapinit.trust.signing import sign_module

#: Seconds a client is told to wait after a 503.
RETRY_AFTER: Final = 5


class CompileSlots:
    """At most ``workers`` compiles at once; at most ``queue_size`` more may wait."""

    def __init__(self, workers: int, queue_size: int) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self.running = 0
        self.waiting = 0
        self._cond = threading.Condition()

    def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting up to ``timeout`` s in the queue; False when busy."""
        with self._cond:
            if self.running < self.workers:
                self.running += 1
                return True
            if self.waiting >= self.queue_size:
                return False
            self.waiting += 1
            try:
                got = self._cond.wait_for(lambda: self.running < self.workers, timeout)
            finally:
                self.waiting -= 1
            if got:
                self.running += 1
            return got

    def release(self) -> None:
        """Give a slot back and wake one waiter."""
        with self._cond:
            self.running -= 1
            self._cond.notify()


class KeyedLocks:
    """One lock per key, kept only while used: identical requests compile once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Hold the lock of ``key`` for the duration of the ``with`` block."""
        with self._lock:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


@dataclass
class Outcome:
    """An HTTP answer plus what the request log should say about it."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    log: dict[str, str] = field(default_factory=dict)


def request_log_fields(req: CompileRequest) -> dict[str, str]:
    """What the log records about a request: script hash, target and options."""
    digest = hashlib.sha256(req.script_text.encode("utf-8"))
    for tapset in sorted(req.tapsets, key=lambda t: t.path):
        digest.update(b"\0" + tapset.path.encode("utf-8") + b"\0" + tapset.text.encode("utf-8"))
    return {
        "script": "sha256:" + digest.hexdigest()[:16],
        "privilege": req.privilege,
        "release": req.release,
        "runtime": req.effective_runtime(),
        "options": " ".join(req.options) or "-",
    }


class CompileService:
    """The server's behaviour, one call per request (thread-safe)."""

    def __init__(
        self,
        info: ServerInfo,
        identity: Identity,
        compiler: Compiler,
        cache: CompileCache | None,
        slots: CompileSlots,
        stap_version: str,
        queue_timeout: float,
    ) -> None:
        self.info = info
        self.identity = identity
        self.compiler = compiler
        self.cache = cache
        self.slots = slots
        self.stap_version = stap_version
        self.queue_timeout = queue_timeout
        self._inflight = KeyedLocks()

    def server_info(self) -> Outcome:
        """The ``GET /`` answer."""
        return Outcome(200, encode_server_info(self.info), log={"result": "info"})

    def compile(self, body: bytes) -> Outcome:
        """Handle the body of ``POST /compile``."""
        try:
            req = decode_compile_request(body)
        except ProtocolError as exc:
            return Outcome(400, encode_error(str(exc)), log={"result": f"bad-request: {exc}"})
        log = request_log_fields(req)
        try:
            parsed = check_request(req, self.info.releases, self.info.arch)
        except PolicyError as exc:
            log["result"] = f"refused: {exc}"
            return Outcome(400, encode_error(str(exc)), log=log)
        key = cache_key(req, parsed, self.stap_version, self.identity.fingerprint)
        with self._inflight.hold(key):
            response = self._from_cache(key)
            if response is None:
                if not self.slots.acquire(self.queue_timeout):
                    log["result"] = "busy"
                    message = (
                        f"server busy: {self.slots.workers} compiles running and "
                        f"{self.slots.queue_size} waiting; retry in {RETRY_AFTER} s"
                    )
                    return Outcome(
                        503,
                        encode_error(message),
                        {"Retry-After": str(RETRY_AFTER)},
                        log,
                    )
                try:
                    result = self.compiler.compile(req, parsed)
                finally:
                    self.slots.release()
                response = self._finish(req, key, result)
        log["result"] = f"stap-exit-{response.status}"
        log["cached"] = "yes" if response.cached else "no"
        if response.module is not None:
            log["module"] = response.module.name
        return Outcome(200, encode_compile_response(response), log=log)

    def _from_cache(self, key: str) -> CompileResponse | None:
        hit = None if self.cache is None else self.cache.get(key)
        if hit is None:
            return None
        return CompileResponse(0, hit.stdout, hit.stderr, hit.module, hit.signature, cached=True)

    def _finish(self, req: CompileRequest, key: str, result: CompileResult) -> CompileResponse:
        signature = None
        if result.module is not None and req.privilege == "stapusr":
            signature = sign_module(
                self.identity.key,
                self.identity.cert,
                result.module.data,
                result.module.name,
                req.release,
                req.arch,
                req.privilege,
            )
        if result.status == 0 and result.module is not None and self.cache is not None:
            self.cache.put(
                key, CachedResult(result.stdout, result.stderr, result.module, signature)
            )
        return CompileResponse(
            result.status, result.stdout, result.stderr, result.module, signature, cached=False
        )
