"""Judging a received module: its signature against the signer store, then the policy.

The signature file comes from the caller and is parsed by
:func:`stapinit.trust.signing.verify_module`; whatever it holds, the outcome is
a verdict with a one-line reason, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

from stapinit.loader.callers import this_host
from stapinit.loader.policy import (
    Caller,
    Decision,
    Level,
    SignatureStatus,
    caller_level,
    may_load,
    must_check_user_space,
)
from stapinit.loader.spool import SpooledRequest
from stapinit.trust.bpfelf import user_space_probes
from stapinit.trust.signing import Manifest, SignatureError, verify_module
from stapinit.trust.stores import TrustStore


@dataclass(frozen=True)
class SignatureCheck:
    """Outcome of checking a module's signature against the signer store."""

    status: SignatureStatus
    manifest: Manifest | None = None
    detail: str = ""


def check_signature(signature: bytes | None, module: bytes, store: TrustStore) -> SignatureCheck:
    """Verify ``signature`` over ``module`` against the certificates ``store`` vouches for."""
    if signature is None:
        return SignatureCheck("unsigned")
    warnings: list[str] = []
    certs = [c.certificate for c in store.certificates(warnings.append)]
    try:
        manifest = verify_module(signature, module, certs)
    except SignatureError as exc:
        detail = "; ".join([str(exc), *warnings])
        return SignatureCheck(exc.reason, detail=detail)
    except (ValueError, RecursionError, TypeError):
        # JSON the signature parser does not expect: integers beyond Python's
        # digit limit, arrays nested thousands deep, fields of odd types.
        return SignatureCheck("malformed", detail="malformed signature file: not readable")
    return SignatureCheck("valid", manifest)


def judge(caller: Caller, req: SpooledRequest, store: TrustStore) -> Decision:
    """The policy's verdict on ``caller`` loading ``req`` on this host.

    The module is looked at only when its signature matters: for a caller
    below stapdev who sent one.
    """
    level = caller_level(caller.uid, caller.groups)
    check = SignatureCheck("unsigned")
    probes: list[str] = []
    if level is not None and level < Level.STAPDEV and req.signature is not None:
        with req.module_bytes() as module:
            check = check_signature(req.signature, module, store)
            if check.status == "valid" and must_check_user_space(caller, req.module_name):
                try:
                    probes = user_space_probes(module)
                except ValueError as exc:
                    return Decision(False, f"module {req.module_name} cannot be examined: {exc}")
    return may_load(
        caller,
        req.module_name,
        check.manifest,
        check.status,
        this_host(),
        check.detail,
        user_space_probes=probes,
    )
