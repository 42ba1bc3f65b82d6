"""What the server does with a request, independent of HTTP and TLS.

:class:`CompileApp` turns a request body into an :class:`Outcome` (HTTP status,
JSON body, extra headers, fields for the request log): decode, apply the policy,
answer from the cache, else wait for a compile slot, compile, sign, store.

Identical requests that arrive while one of them is being compiled do not compile
again: they wait for that compile (counted among the ``QUEUE_SIZE`` waiting
requests, refused with 503 beyond it) and get its result, a failure included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Final

from stapinit.core.runtime import RuntimeKind
from stapinit.protocol import (
    CompileRequest,
    CompileResponse,
    ProtocolError,
    ServerInfo,
    decode_compile_request,
    encode_compile_response,
    encode_error,
    encode_server_info,
    source_digest,
)
from stapinit.server.cache import CachedResult, CompileCache, cache_key
from stapinit.server.compiler import CompileOutcome, Compiler
from stapinit.server.identity import Identity
from stapinit.server.policy import ParsedOptions, PolicyError, check_request
from stapinit.trust.bpfelf import user_space_probes
from stapinit.trust.signing import sign_module

#: Seconds a client is told to wait after a 503.
RETRY_AFTER: Final = 5
#: Why an unprivileged BPF module with a process probe is refused (neither returned
#: nor signed): stapbpf has no per-user filter for uprobes, so a signature for
#: ``stapusr`` would let any member of stapusr probe everyone's processes.  The same
#: module compiled for stapdev is signed for ``stapdev``, which only root and stapdev
#: members may load anyway.
USER_SPACE_REFUSAL: Final = (
    "user-space probes (process.*) are not allowed in unprivileged BPF modules: "
    "stapbpf cannot limit them to the caller's processes"
)
#: Beyond the queue and compile limits, how long an identical request waits for
#: the one being compiled (signing and storing the result).
_FOLLOW_SLACK: Final = 30.0


class CompileSlots:
    """At most ``workers`` compiles at once; at most ``queue_size`` more may wait."""

    def __init__(self, workers: int, queue_size: int) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self.running = 0
        self.waiting = 0
        self._cond = threading.Condition()

    def enter_queue(self) -> bool:
        """Take a place in the queue without waiting for a slot; False when it is full.

        For a request that waits for an identical one to be compiled: it occupies
        the queue like any waiting request.  Leave with :meth:`leave_queue`.
        """
        with self._cond:
            if self.waiting >= self.queue_size:
                return False
            self.waiting += 1
            return True

    def leave_queue(self) -> None:
        """Give back a place taken with :meth:`enter_queue`."""
        with self._cond:
            self.waiting -= 1

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


@dataclass
class Flight:
    """One compile in progress and the identical requests waiting for it."""

    done: threading.Event = field(default_factory=threading.Event)
    #: The result, once ``done``; None when the compile did not happen (no slot).
    response: CompileResponse | None = None
    followers: int = 0


class InFlight:
    """Compiles in progress by cache key: identical requests share one compile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}

    def join(self, key: str) -> tuple[Flight, bool]:
        """The flight for ``key`` and whether the caller leads it (must compile)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = Flight()
                return flight, True
            flight.followers += 1
            return flight, False

    def land(self, key: str, flight: Flight, response: CompileResponse | None) -> None:
        """The leader is done: hand ``response`` to the followers; later requests start anew."""
        with self._lock:
            flight.response = response
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.done.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._flights)


@dataclass
class Outcome:
    """An HTTP answer plus what the request log should say about it."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    log: dict[str, str] = field(default_factory=dict)


def request_log_fields(req: CompileRequest, runtime: RuntimeKind | None = None) -> dict[str, str]:
    """What the log records about a request: script hash, target and options.

    ``runtime`` is the one the policy found (:class:`ParsedOptions`), absent for a
    request refused before that.
    """
    digest = hashlib.sha256(req.script_text.encode("utf-8"))
    for tapset in sorted(req.tapsets, key=lambda t: t.path):
        digest.update(b"\0" + tapset.path.encode("utf-8") + b"\0" + tapset.text.encode("utf-8"))
    fields = {
        "script": "sha256:" + digest.hexdigest()[:16],
        "privilege": req.privilege,
        "release": req.release,
    }
    if runtime is not None:
        fields["runtime"] = runtime
    fields["options"] = " ".join(req.options) or "-"
    return fields


class CompileApp:
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
        self._inflight = InFlight()

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
        log = request_log_fields(req, parsed.runtime)
        key = cache_key(req, parsed, self.stap_version, self.identity.fingerprint)
        response = self._from_cache(key)
        if response is None:
            flight, leader = self._inflight.join(key)
            if leader:
                response = self._lead(flight, key, req, parsed, log)
            else:
                response = self._follow(flight, log)
            if response is None:
                log["result"] = "busy"
                return self._busy(log)
        log["result"] = f"stap-exit-{response.status}"
        log.setdefault("cached", "yes" if response.cached else "no")
        if response.module is not None:
            log["module"] = response.module.name
        return Outcome(200, encode_compile_response(response), log=log)

    def _busy(self, log: dict[str, str]) -> Outcome:
        message = (
            f"server busy: {self.slots.workers} compiles running and "
            f"{self.slots.queue_size} waiting; retry in {RETRY_AFTER} s"
        )
        return Outcome(503, encode_error(message), {"Retry-After": str(RETRY_AFTER)}, log)

    def _lead(
        self,
        flight: Flight,
        key: str,
        req: CompileRequest,
        parsed: ParsedOptions,
        log: dict[str, str],
    ) -> CompileResponse | None:
        """Compile for everyone who sends this request meanwhile; None when busy."""
        response = None
        try:
            # An identical compile may have finished since the first look.
            response = self._from_cache(key)
            if response is None and self.slots.acquire(self.queue_timeout):
                try:
                    result = self.compiler.compile(req, parsed)
                finally:
                    self.slots.release()
                response = self._finish(req, parsed, key, result, log)
        finally:
            self._inflight.land(key, flight, response)
        if flight.followers:  # no one joins a landed flight: the count is final
            log["shared_with"] = str(flight.followers)
        return response

    def _follow(self, flight: Flight, log: dict[str, str]) -> CompileResponse | None:
        """Wait, as a queued request, for an identical compile; None when busy."""
        if not self.slots.enter_queue():
            return None
        try:
            wait = self.queue_timeout + self.compiler.limits.wall_seconds + _FOLLOW_SLACK
            flight.done.wait(wait)
        finally:
            self.slots.leave_queue()
        response = flight.response
        if response is None:
            return None
        log["cached"] = "shared"  # the result of the identical request compiled meanwhile
        return dataclasses.replace(response, cached=True)

    def _from_cache(self, key: str) -> CompileResponse | None:
        hit = None if self.cache is None else self.cache.get(key)
        if hit is None:
            return None
        return CompileResponse(0, hit.stdout, hit.stderr, hit.module, hit.signature, cached=True)

    def _finish(
        self,
        req: CompileRequest,
        parsed: ParsedOptions,
        key: str,
        result: CompileOutcome,
        log: dict[str, str],
    ) -> CompileResponse:
        signature = None
        if result.module is not None and req.privilege == "stapusr" and parsed.runtime == "bpf":
            refusal = _bpf_signing_refusal(result.module.data)
            if refusal is not None:
                # Answered like a failed compile: no module, nothing signed or cached.
                message, log["refused"] = refusal
                stderr = f"{result.stderr}stap-server: {message}\n"
                result = dataclasses.replace(result, status=1, stderr=stderr, module=None)
        if result.module is not None:
            # Every module is signed, for the privilege it was compiled for: the
            # loader lets a caller run only what was signed for their level or
            # below, and hosts with REQUIRE_SIGNED=yes load nothing unsigned.
            # The options signed are those that shape the module (parsed.signed);
            # the source, the digest of the very text compiled (written as UTF-8,
            # see compiler.py) and of the -I tapsets compiled with it, so a host
            # can tell its own script's module from one any client had compiled
            # under the same name, or with tapsets of their own.
            signature = sign_module(
                self.identity.key,
                self.identity.cert,
                result.module.data,
                result.module.name,
                req.release,
                req.arch,
                req.privilege,
                source=source_digest(req.script_text.encode("utf-8"), req.tapsets),
                options=parsed.signed,
                runtime=parsed.runtime,
            )
        if result.status == 0 and result.module is not None and self.cache is not None:
            self.cache.put(
                key, CachedResult(result.stdout, result.stderr, result.module, signature)
            )
        return CompileResponse(
            result.status, result.stdout, result.stderr, result.module, signature, cached=False
        )


def _bpf_signing_refusal(module: bytes) -> tuple[str, str] | None:
    """Why an unprivileged BPF module must not be signed: (for the client, for the log).

    None when it may be signed.
    """
    try:
        probes = user_space_probes(module)
    except ValueError as exc:
        reason = f"cannot check the BPF module for user-space probes: {exc}"
        return reason, reason
    if probes:
        return USER_SPACE_REFUSAL, "user-space probes: " + " ".join(probes)
    return None
