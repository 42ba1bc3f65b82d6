"""Trust stores: directories of PEM certificates named by their SHA-256 fingerprint.

Three stores exist (spec §6.2.1, §6.1.2):

* trusted servers, system-wide: ``/etc/systemtap/ssl/client/``
* trusted servers, per user: ``~/.systemtap/ssl/client/``
* trusted module signers: ``/etc/systemtap/staprun/`` (root's alone)

A store is only believed if nobody but its rightful owner could have put a
certificate in it: the directory and every directory above it must belong to root
(or, for a user's own store, to that user) and must not be writable by group or
others.  A store failing that is ignored with a warning saying why.

All paths come from :class:`StorePaths`; nothing else names them.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stapinit.core.fsutil import atomic_write, set_mode
from stapinit.trust.certs import (
    FINGERPRINT_PREFIX,
    CertificateError,
    fingerprint,
    load_certificate,
)

#: Environment variable prefixing the system-wide store paths (tests, chroots).
TRUST_ROOT_ENV = "STAP_TRUST_ROOT"

_SYSCONF_DIR = "etc/systemtap"
_USER_DIR = ".systemtap"

_HEX_RE = re.compile(r"[0-9a-f]{64}")

Warn = Callable[[str], None]


class StoreError(Exception):
    """A store cannot be used or changed; ``str()`` is one line for the user."""


@dataclass(frozen=True)
class StorePaths:
    """Where the three trust stores and the configuration files that go with them live."""

    sysconf: Path
    user_dir: Path | None

    @property
    def system_servers(self) -> Path:
        """Trusted servers, system-wide."""
        return self.sysconf / "ssl" / "client"

    @property
    def user_servers(self) -> Path | None:
        """Trusted servers of the user whose home this is."""
        return None if self.user_dir is None else self.user_dir / "ssl" / "client"

    @property
    def signers(self) -> Path:
        """Trusted module signers."""
        return self.sysconf / "staprun"

    @classmethod
    def default(
        cls, environ: Mapping[str, str] | None = None, home: Path | None = None
    ) -> StorePaths:
        """The standard paths: ``/etc/systemtap`` (under ``$STAP_TRUST_ROOT`` if set)
        and ``home``'s ``.systemtap``.

        ``home`` defaults to ``$HOME``; with neither there is no per-user store.
        """
        env = os.environ if environ is None else environ
        root = Path(env.get(TRUST_ROOT_ENV) or "/")
        if home is None and env.get("HOME"):
            home = Path(env["HOME"])
        return cls(
            sysconf=root / _SYSCONF_DIR,
            user_dir=None if home is None else home / _USER_DIR,
        )


# --- pure helpers ------------------------------------------------------------------


def normalize_fingerprint(text: str) -> str:
    """Return ``SHA256:<64 lowercase hex>`` for a fingerprint typed in any usual way.

    Accepts an optional ``SHA256:`` prefix (any case), colons between bytes and
    upper-case hex; raises ValueError for anything else.
    """
    body = text.strip()
    if body.upper().startswith(FINGERPRINT_PREFIX):
        body = body[len(FINGERPRINT_PREFIX) :]
    body = body.replace(":", "").lower()
    if not _HEX_RE.fullmatch(body):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits)")
    return FINGERPRINT_PREFIX + body


def file_name_for(fp: str) -> str:
    """The store file name of a certificate with fingerprint ``fp``: ``<hex>.pem``."""
    return normalize_fingerprint(fp)[len(FINGERPRINT_PREFIX) :] + ".pem"


def unsafe_reason(
    path: Path, st_uid: int, st_mode: int, owners: Iterable[int], *, is_ancestor: bool
) -> str | None:
    """Why a store directory (or one above it) cannot be trusted, or None if it can.

    ``owners`` are the uids allowed to own it.  A world-writable directory above the
    store is tolerated only with the sticky bit (like ``/tmp``): then nobody but the
    owner of the entry beneath it may rename or replace that entry.
    """
    allowed = set(owners)
    if st_uid not in allowed:
        names = " or ".join("root" if uid == 0 else f"uid {uid}" for uid in sorted(allowed))
        return f"{path} is owned by uid {st_uid}, not {names}"
    writable = st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (is_ancestor and st_mode & stat.S_ISVTX):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st_mode):04o})"
    return None


# --- the store ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrustedCert:
    """A certificate found in a store."""

    fingerprint: str
    certificate: x509.Certificate
    path: Path


@dataclass(frozen=True)
class TrustStore:
    """One store directory and the uids allowed to own it (and its certificates)."""

    path: Path
    owners: frozenset[int]
    label: str

    def problem(self) -> str | None:
        """Why this store may not be trusted, or None.  A missing store is fine (empty)."""
        try:
            real = self.path.resolve()
            st = real.lstat()
        except FileNotFoundError:
            return None
        except (OSError, RuntimeError) as exc:
            return f"cannot inspect {self.path}: {exc}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{self.path} is not a directory"
        reason = unsafe_reason(real, st.st_uid, st.st_mode, self.owners, is_ancestor=False)
        if reason:
            return reason
        # Anyone able to rename a directory above the store (or re-point a symlink on
        # the way to it) could swap in their own: check both the path as written and
        # the real directories it leads to.
        ancestor_owners = self.owners | {0}
        for parent in dict.fromkeys([*real.parents, *self.path.absolute().parents]):
            try:
                pst = parent.lstat()
            except OSError as exc:
                return f"cannot inspect {parent}: {exc.strerror}"
            if stat.S_ISLNK(pst.st_mode):
                continue  # its directory and its target are checked in their own right
            reason = unsafe_reason(
                parent, pst.st_uid, pst.st_mode, ancestor_owners, is_ancestor=True
            )
            if reason:
                return reason
        return None

    def certificates(self, warn: Warn) -> list[TrustedCert]:
        """The certificates this store vouches for; [] (with a warning) if it is unsafe."""
        reason = self.problem()
        if reason:
            warn(f"ignoring the {self.label} at {self.path}: {reason}")
            return []
        try:
            entries = sorted(self.path.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            warn(f"cannot read the {self.label} at {self.path}: {exc.strerror}")
            return []
        found: list[TrustedCert] = []
        for entry in entries:
            if entry.suffix != ".pem":
                continue
            cert = self._read_entry(entry, warn)
            if cert is not None:
                found.append(cert)
        return found

    def _read_entry(self, entry: Path, warn: Warn) -> TrustedCert | None:
        try:
            st = entry.lstat()
        except OSError as exc:
            warn(f"ignoring {entry}: {exc.strerror}")
            return None
        if not stat.S_ISREG(st.st_mode):
            warn(f"ignoring {entry}: not a regular file")
            return None
        reason = unsafe_reason(entry, st.st_uid, st.st_mode, self.owners, is_ancestor=False)
        if reason:
            warn(f"ignoring {entry}: {reason}")
            return None
        try:
            cert = load_certificate(entry)
        except CertificateError as exc:
            warn(f"ignoring {entry}: {exc}")
            return None
        return TrustedCert(fingerprint(cert), cert, entry)

    def fingerprints(self, warn: Warn) -> set[str]:
        """Fingerprints of the certificates this store vouches for."""
        return {c.fingerprint for c in self.certificates(warn)}

    def add(self, cert: x509.Certificate) -> tuple[Path, bool]:
        """Store ``cert``; returns its path and False if it was already there."""
        fp = fingerprint(cert)
        target = self.path / file_name_for(fp)
        try:
            _make_dirs(self.path)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc.strerror}") from None
        reason = self.problem()
        if reason:
            raise StoreError(f"the {self.label} at {self.path} is unsafe: {reason}")
        present = self._read_entry(target, lambda _message: None)
        if present is not None and present.fingerprint == fp:
            return target, False
        try:
            atomic_write(target, cert.public_bytes(Encoding.PEM), 0o644, durable=True)
        except OSError as exc:
            raise StoreError(f"cannot write {target}: {exc.strerror}") from None
        return target, True

    def revoke(self, fp: str) -> Path:
        """Remove the certificate with fingerprint ``fp``; returns the removed path."""
        try:
            target = self.path / file_name_for(fp)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        try:
            target.unlink()
        except FileNotFoundError:
            raise StoreError(f"{normalize_fingerprint(fp)} is not in {self.path}") from None
        except OSError as exc:
            raise StoreError(f"cannot remove {target}: {exc.strerror}") from None
        return target


def system_server_store(paths: StorePaths) -> TrustStore:
    """The system-wide store of trusted servers (root-owned)."""
    return TrustStore(paths.system_servers, frozenset({0}), "system-wide server trust store")


def user_server_store(paths: StorePaths, uid: int) -> TrustStore | None:
    """``uid``'s own store of trusted servers, if there is a home directory."""
    if paths.user_servers is None:
        return None
    return TrustStore(paths.user_servers, frozenset({uid, 0}), "per-user server trust store")


def signer_store(paths: StorePaths) -> TrustStore:
    """The store of trusted module signers (root's alone)."""
    return signer_store_at(paths.signers)


def signer_store_at(path: Path) -> TrustStore:
    """A signer store at a configured ``path`` (root's alone)."""
    return TrustStore(path, frozenset({0}), "signer trust store")


def trusted_server_fingerprints(paths: StorePaths, uid: int, warn: Warn) -> set[str]:
    """Fingerprints of every server ``uid`` trusts: system-wide and their own."""
    trusted = system_server_store(paths).fingerprints(warn)
    user_store = user_server_store(paths, uid)
    if user_store is not None:
        trusted |= user_store.fingerprints(warn)
    return trusted


# --- file helpers ------------------------------------------------------------------


def _make_dirs(path: Path) -> None:
    """Create ``path`` and missing parents with mode 0755, whatever the umask."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
            set_mode(directory, 0o755)  # by descriptor: never through a swapped-in symlink
