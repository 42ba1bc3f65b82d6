"""The server's identity: its private key and the certificate clients authorize.

Both live in ``STATE_DIR/.systemtap/ssl/server/`` (``stap.key``, ``stap.cert``;
§6.1.3).  They are generated on first start.  To renew, stop the server, remove
both files, start it again and have every client authorize the new ``stap.cert``.

Both files belong to the user the server starts as -- root in production: it
reads the key before becoming the service user, so that no compile (they run as
the service user) can read the key.  The key must not be accessible to group or
others; the certificate (0644) is for everyone to read, not to change.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from stapinit.core.errors import StapinitError
from stapinit.core.lsb import EXIT_NOT_CONFIGURED
from stapinit.trust import certs

KEY_NAME = "stap.key"
CERT_NAME = "stap.cert"
#: Warn in the log when the certificate has less than this left.
EXPIRY_WARNING = dt.timedelta(days=30)


class IdentityError(StapinitError):
    """The key or certificate cannot be used; ``str()`` is one line (exit 6)."""

    exit_code = EXIT_NOT_CONFIGURED


@dataclass(frozen=True)
class Identity:
    """A loaded key and certificate, with the paths they came from."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    key_path: Path
    cert_path: Path

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` of the certificate."""
        return certs.fingerprint(self.cert)


def check_key_file(path: Path, cert_path: Path) -> None:
    """Refuse a key file that others could read or that belongs to another user."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise IdentityError(f"private key {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"private key {path} is group- or world-accessible (mode {mode:04o}); "
            f"refusing to start: run 'chmod 600 {path}' (and consider the key compromised)"
        )
    euid = os.geteuid()
    if info.st_uid != euid and euid == 0:
        # Earlier versions kept the key as the service user, whose compiles could read it.
        raise IdentityError(
            f"private key {path} belongs to uid {info.st_uid}, not to root; if compiles ran "
            f"as that user, consider the key exposed: remove {path} and {cert_path} to "
            "generate a new identity (and authorize it on the clients again), or keep it "
            f"with 'chown root:root {path} {cert_path}'"
        )
    if info.st_uid != euid:
        raise IdentityError(
            f"private key {path} belongs to uid {info.st_uid}, not to the server's "
            f"user (uid {euid})"
        )


def check_cert_file(path: Path) -> None:
    """Refuse a certificate file that another user could replace."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise IdentityError(f"certificate {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    euid = os.geteuid()
    if info.st_uid != euid or mode & 0o022:
        # Clients are told to authorize this file: nobody else may swap it.
        raise IdentityError(
            f"certificate {path} must belong to the server's user (uid {euid}) and be "
            f"writable by it alone (owner uid {info.st_uid}, mode {mode:04o}); fix it "
            f"with: chown {euid}:{os.getegid()} {path}; chmod 644 {path}"
        )


def load_or_create(cert_dir: Path, days: int, now: dt.datetime | None = None) -> Identity:
    """Load the identity from ``cert_dir``, generating it when neither file exists.

    Raises IdentityError when only one of the files exists, the key is exposed,
    the two do not belong together, or the certificate has expired.
    """
    key_path, cert_path = cert_dir / KEY_NAME, cert_dir / CERT_NAME
    have_key, have_cert = key_path.exists(), cert_path.exists()
    if not have_key and not have_cert:
        try:
            cert_dir.mkdir(parents=True, exist_ok=True)
            key, cert = certs.generate_identity(key_path, cert_path, socket.getfqdn(), days)
        except OSError as exc:
            raise IdentityError(
                f"cannot create server identity in {cert_dir}: {exc.strerror or exc}"
            ) from None
        return Identity(key, cert, key_path, cert_path)
    if not have_key:
        raise IdentityError(
            f"{cert_path} exists but its key {key_path} is missing; "
            "remove the certificate to generate a new identity"
        )
    if not have_cert:
        raise IdentityError(
            f"{key_path} exists but its certificate {cert_path} is missing; "
            "remove the key to generate a new identity"
        )
    check_key_file(key_path, cert_path)
    check_cert_file(cert_path)
    try:
        key = certs.load_private_key(key_path)
        cert = certs.load_certificate(cert_path)
    except certs.CertificateError as exc:
        raise IdentityError(str(exc)) from None
    if not certs.key_matches(key, cert):
        raise IdentityError(f"{cert_path} is not the certificate of {key_path}")
    expiry = certs.not_valid_after(cert)
    if expiry <= (now or dt.datetime.now(dt.UTC)):
        raise IdentityError(
            f"certificate {cert_path} expired on {expiry:%Y-%m-%d}; to renew, remove "
            f"{key_path} and {cert_path}, start the server and re-authorize it on clients"
        )
    return Identity(key, cert, key_path, cert_path)


def expires_soon(identity: Identity, now: dt.datetime | None = None) -> bool:
    """Whether the certificate expires within :data:`EXPIRY_WARNING`."""
    left = certs.not_valid_after(identity.cert) - (now or dt.datetime.now(dt.UTC))
    return left < EXPIRY_WARNING
