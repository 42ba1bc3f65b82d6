"""``stap-authorize-server-cert`` (spec §6.2.1) and ``stap-authorize-signing-cert`` (§6.1.2).

Both add a certificate to a trust store, list a store (``--list``) or remove a
certificate by fingerprint (``--revoke``).  Server certificates go to the
system-wide store when run as root, to the user's own otherwise; signers are
root's business alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from stapinit.trust.certs import CertificateError, describe, load_certificate
from stapinit.trust.stores import (
    StoreError,
    StorePaths,
    TrustStore,
    signer_store,
    system_server_store,
    user_server_store,
)


def _parser(prog: str, what: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=f"Authorize a {what} certificate.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("certfile", nargs="?", type=Path, help="the certificate file to trust")
    action.add_argument("--list", action="store_true", help="list the trusted certificates")
    action.add_argument("--revoke", metavar="FINGERPRINT", help="stop trusting a certificate")
    return parser


def _add(store: TrustStore, certfile: Path, warn: Callable[[str], None]) -> None:
    cert = load_certificate(certfile)
    info = describe(cert)
    now = dt.datetime.now(dt.UTC)
    if info.not_after < now:
        warn(f"warning: the certificate expired on {info.not_after:%Y-%m-%d}")
    elif info.not_before > now:
        warn(f"warning: the certificate is not valid before {info.not_before:%Y-%m-%d}")
    path, added = store.add(cert)
    if added:
        print(f"Trusted certificate added to the {store.label}: {path}")
    else:
        print(f"Certificate already in the {store.label}: {path}")
    print(f"  subject: {info.subject}")
    print(f"  fingerprint: {info.fingerprint}")
    print(f"  expires: {info.not_after:%Y-%m-%d %H:%M:%S} UTC")


def _list(stores: Sequence[TrustStore], warn: Callable[[str], None]) -> None:
    for store in stores:
        certs = store.certificates(warn)
        print(f"{store.label} ({store.path}): {len(certs)} certificate(s)")
        for trusted in certs:
            info = describe(trusted.certificate)
            print(
                f"  {info.fingerprint}  {info.subject}  "
                f"expires {info.not_after:%Y-%m-%d %H:%M:%S} UTC"
            )


def _run(
    prog: str,
    argv: Sequence[str] | None,
    what: str,
    target: TrustStore,
    readable: Sequence[TrustStore],
) -> int:
    args = _parser(prog, what).parse_args(argv)

    def warn(message: str) -> None:
        print(f"{prog}: {message}", file=sys.stderr)

    try:
        if args.list:
            _list(readable, warn)
        elif args.revoke is not None:
            removed = target.revoke(args.revoke)
            print(f"Removed {removed} from the {target.label}")
        else:
            _add(target, args.certfile, warn)
    except (CertificateError, StoreError) as exc:
        warn(str(exc))
        return 1
    except Exception as exc:  # the one-line promise holds even for the unforeseen
        warn(f"internal error: {type(exc).__name__}: {exc}")
        return 1
    return 0


def authorize_server_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stap-authorize-server-cert``."""
    prog = "stap-authorize-server-cert"
    paths = StorePaths.default()
    system = system_server_store(paths)
    if os.geteuid() == 0:
        return _run(prog, argv, "stap-server", system, [system])
    user = user_server_store(paths, os.geteuid())
    if user is None:
        print(f"{prog}: HOME is not set, so there is no per-user store", file=sys.stderr)
        return 1
    return _run(prog, argv, "stap-server", user, [system, user])


def authorize_signing_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stap-authorize-signing-cert`` (root only)."""
    prog = "stap-authorize-signing-cert"
    if os.geteuid() != 0:
        print(
            f"{prog}: only root may authorize module signers (the signer store is root's)",
            file=sys.stderr,
        )
        return 1
    store = signer_store(StorePaths.default())
    return _run(prog, argv, "module signer", store, [store])
