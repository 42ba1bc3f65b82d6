from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from stapinit.trust.certs import generate_identity
from tests.trust.people import User, ensure_users


@dataclass(frozen=True)
class Identity:
    """A certificate (and its file) such as a stap-server has."""

    cert: x509.Certificate
    cert_path: Path


def make_identity(directory: Path, name: str = "server.example") -> Identity:
    """Generate a key and self-signed certificate in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    _key, cert = generate_identity(directory / "stap.key", directory / "stap.cert", name)
    return Identity(cert, directory / "stap.cert")


@pytest.fixture
def identity(tmp_path: Path) -> Identity:
    """A fresh server identity."""
    return make_identity(tmp_path / "identity")


@pytest.fixture(scope="session")
def users() -> dict[str, User]:
    """The real test users, by name."""
    return ensure_users()
