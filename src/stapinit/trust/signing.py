"""Detached module signatures (``NAME.ko.sgn`` / ``NAME.bo.sgn``).

A signature file is JSON::

    {"format": "stap-module-signature/3",
     "manifest": {"module_sha256", "module_name", "source", "release", "arch",
                  "runtime", "privilege", "options", "signer_fingerprint",
                  "signed_at"},
     "signature": base64 ECDSA-SHA256 over the canonical JSON of the manifest}

The manifest carries the module's SHA-256, so the signature covers the module's
bytes as well as everything that makes a compiled script valid for a host: the
kernel release and architecture, the runtime (``kmod``/``bpf``), the privilege
level it was compiled for (``stapdev``/``stapusr``; what the loader lets a
caller run, spec §6.1.2) and the stap options that shaped it (a list of
strings, in the order given: those a cache record holds, not options that
change only what stap prints, such as ``-v`` or ``-w``).  ``source`` is what the
server compiled, as it computed it from the request: the SHA-256 of the script
text, or with ``-I`` tapsets one over the text and every tapset
(:func:`stapinit.protocol.source_digest`). A signature proves only which server
compiled a module, so a host that loads it for one of its own scripts
(``REQUIRE_SIGNED=yes``) checks that it was compiled from that script's text
and the tapsets of that script's ``-I`` directories.  A signature counts only while the signer's
certificate is valid, and only if it was made while it was.  Pure: no file I/O
here.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from stapinit.core.runtime import kind_of_module
from stapinit.trust.certs import fingerprint, not_valid_after, not_valid_before

FORMAT: Final = "stap-module-signature/3"
SIGNATURE_SUFFIX: Final = ".sgn"
#: How ``signed_at`` is written: UTC, to the second.
TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"

Reason = Literal[
    "malformed",
    "untrusted-signer",
    "bad-signature",
    "signer-expired",
    "signer-not-yet-valid",
    "module-altered",
]


class SignatureError(Exception):
    """A signature does not verify; ``reason`` says why, ``str()`` is one line."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


@dataclass(frozen=True)
class Manifest:
    """What a signature vouches for."""

    module_sha256: str
    module_name: str
    source: str  # protocol.source_digest of the script text and tapsets compiled
    release: str
    arch: str
    runtime: str
    privilege: str
    options: tuple[str, ...]
    signer_fingerprint: str
    signed_at: str

    def canonical(self) -> bytes:
        """The exact bytes that are signed."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign_module(
    private_key: ec.EllipticCurvePrivateKey,
    certificate: x509.Certificate,
    module_bytes: bytes | bytearray,
    module_name: str,
    release: str,
    arch: str,
    privilege: str,
    signed_at: dt.datetime | None = None,
    *,
    source: str,
    options: Sequence[str] = (),
    runtime: str | None = None,
) -> bytes:
    """Return the bytes of the ``.sgn`` file for a module, signed with ``private_key``.

    ``module_name`` is the module's file name (``NAME.ko`` or ``NAME.bo``);
    ``certificate`` is the signer's (its fingerprint goes into the manifest);
    ``source`` is :func:`stapinit.protocol.source_digest` of the script text
    and ``-I`` tapsets compiled (computed by the signer, never taken from
    whoever asked); ``signed_at`` defaults to now;
    ``options`` are the stap options that shaped the module (report-only ones
    left out); ``runtime`` defaults to the one the module's suffix names.
    Raises ValueError when ``runtime`` is not given and the suffix names none.
    """
    when = (signed_at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    kind = runtime or kind_of_module(module_name)
    if kind is None:
        raise ValueError(f"{module_name!r} is not a module file name (NAME.ko or NAME.bo)")
    manifest = Manifest(
        module_sha256=hashlib.sha256(module_bytes).hexdigest(),
        module_name=module_name,
        source=source,
        release=release,
        arch=arch,
        runtime=kind,
        privilege=privilege,
        options=tuple(options),
        signer_fingerprint=fingerprint(certificate),
        signed_at=when.strftime(TIME_FORMAT),
    )
    signature = private_key.sign(manifest.canonical(), ec.ECDSA(hashes.SHA256()))
    doc = {
        "format": FORMAT,
        "manifest": asdict(manifest),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode("utf-8")


#: A signature file is a short manifest and a signature; anything larger is hostile.
MAX_SIGNATURE_FILE_BYTES = 64 * 1024


def _parse(sgn_bytes: bytes) -> tuple[Manifest, bytes]:
    def bad(why: str) -> SignatureError:
        return SignatureError("malformed", f"malformed signature file: {why}")

    if len(sgn_bytes) > MAX_SIGNATURE_FILE_BYTES:
        raise bad(f"larger than {MAX_SIGNATURE_FILE_BYTES} bytes")
    try:
        # ValueError: integers past Python's digit limit; RecursionError: deep nesting.
        doc: Any = json.loads(sgn_bytes.decode("utf-8"))
    except (ValueError, RecursionError):
        raise bad("not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"not {FORMAT}")
    fields = doc.get("manifest")
    names = set(Manifest.__dataclass_fields__)
    if not isinstance(fields, dict) or set(fields) != names:
        raise bad("manifest fields missing or unknown")
    options = fields.pop("options")
    if (
        not all(isinstance(v, str) for v in fields.values())
        or not isinstance(options, list)
        or not all(isinstance(v, str) for v in options)
    ):
        raise bad("manifest fields of the wrong type")
    sig_text = doc.get("signature")
    if not isinstance(sig_text, str):
        raise bad("no signature")
    try:
        signature = base64.b64decode(sig_text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise bad("signature is not base64") from None
    return Manifest(**fields, options=tuple(options)), signature


def _check_validity(signer: x509.Certificate, manifest: Manifest, now: dt.datetime) -> None:
    """Refuse unless both ``signed_at`` and ``now`` lie within the signer's validity."""
    try:
        signed_at = dt.datetime.strptime(manifest.signed_at, TIME_FORMAT).replace(tzinfo=dt.UTC)
    except ValueError:
        raise SignatureError(
            "malformed", f"malformed signature file: signed_at {manifest.signed_at!r}"
        ) from None
    start, end = not_valid_before(signer), not_valid_after(signer)
    period = f"(valid {start:%Y-%m-%d %H:%M:%S} to {end:%Y-%m-%d %H:%M:%S} UTC)"
    if now > end:
        raise SignatureError("signer-expired", f"the signer's certificate has expired {period}")
    if now < start:
        raise SignatureError(
            "signer-not-yet-valid", f"the signer's certificate is not yet valid {period}"
        )
    if signed_at > end:
        raise SignatureError(
            "signer-expired",
            f"the module was signed at {manifest.signed_at}, after the signer's certificate "
            f"expired {period}",
        )
    if signed_at < start:
        raise SignatureError(
            "signer-not-yet-valid",
            f"the module was signed at {manifest.signed_at}, before the signer's certificate "
            f"became valid {period}",
        )


def verify_module(
    sgn_bytes: bytes,
    module_bytes: bytes | bytearray,
    trusted_certs: Iterable[x509.Certificate],
    now: dt.datetime | None = None,
) -> Manifest:
    """Check a ``.sgn`` file against a module and the trusted signers.

    Returns the manifest when the signature was made by one of ``trusted_certs``
    over this manifest, both ``signed_at`` and ``now`` (default: the current
    time) lie within that certificate's validity, and the manifest matches
    ``module_bytes``; otherwise raises SignatureError with reason ``malformed``,
    ``untrusted-signer``, ``bad-signature``, ``signer-expired``,
    ``signer-not-yet-valid`` or ``module-altered``.
    """
    manifest, signature = _parse(sgn_bytes)
    signer = next((c for c in trusted_certs if fingerprint(c) == manifest.signer_fingerprint), None)
    if signer is None:
        raise SignatureError(
            "untrusted-signer",
            f"signer {manifest.signer_fingerprint} is not a trusted signer",
        )
    public_key = signer.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError("bad-signature", "signer's certificate has no elliptic-curve key")
    try:
        public_key.verify(signature, manifest.canonical(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError(
            "bad-signature", "signature does not match its manifest (altered?)"
        ) from None
    _check_validity(signer, manifest, (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC))
    if hashlib.sha256(module_bytes).hexdigest() != manifest.module_sha256:
        raise SignatureError(
            "module-altered", f"module {manifest.module_name} does not match its signature"
        )
    return manifest
