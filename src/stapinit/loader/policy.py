"""Who may load which module (spec §6.1.2, §6.1.3).  Pure: no I/O.

* root and members of ``stapdev`` may load any module;
* members of ``stapsys`` or ``stapusr`` only a module whose signature verifies
  against the signer store, that was signed for this host, and whose signed
  privilege level is within theirs;
* anyone else may compile (``-p4``) but never load.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

from stapinit.trust.signing import Manifest

SignatureStatus = Literal[
    "unsigned", "valid", "malformed", "untrusted-signer", "bad-signature", "module-altered"
]


class Level(IntEnum):
    """SystemTap privilege levels, ordered: a higher level may do all a lower may."""

    STAPUSR = 1
    STAPSYS = 2
    STAPDEV = 3


_LEVEL_BY_NAME = {level.name.lower(): level for level in Level}


@dataclass(frozen=True)
class Caller:
    """Who asks, as the kernel and the group database say."""

    uid: int
    name: str
    groups: frozenset[str]


@dataclass(frozen=True)
class Host:
    """What a signed module must have been built for."""

    release: str
    arch: str


@dataclass(frozen=True)
class Decision:
    """The verdict; ``reason`` is one line meant for the user."""

    allowed: bool
    reason: str


def caller_level(uid: int, groups: Collection[str]) -> Level | None:
    """The highest privilege level ``uid`` holds, or None for an ordinary user."""
    if uid == 0 or "stapdev" in groups:
        return Level.STAPDEV
    if "stapsys" in groups:
        return Level.STAPSYS
    if "stapusr" in groups:
        return Level.STAPUSR
    return None


def may_load(
    caller: Caller,
    module_file: str,
    manifest: Manifest | None,
    status: SignatureStatus,
    host: Host,
    detail: str = "",
) -> Decision:
    """Decide whether ``caller`` may load ``module_file``.

    ``status`` is the outcome of checking the module's signature against the signer
    store (``manifest`` is set only when it is ``valid``); ``detail`` is the
    checker's own explanation, appended to refusals.
    """
    who = f"user {caller.name!r}"
    level = caller_level(caller.uid, caller.groups)
    if level is None:
        return Decision(
            False,
            f"{who} is not root nor a member of stapdev, stapsys or stapusr, so may not "
            f"load modules; compile with -p4 to get the module without loading it",
        )
    if level is Level.STAPDEV:
        return Decision(True, f"{who} may load any module (stapdev)")
    suffix = f" ({detail})" if detail else ""
    if status == "unsigned":
        return Decision(
            False,
            f"{who} does not have authority to load the unsigned module {module_file}; "
            f"ask the server to sign it with --unprivileged",
        )
    if status == "untrusted-signer":
        return Decision(
            False,
            f"module {module_file} could not be loaded: the server is not a trusted signer"
            f"{suffix}; authorize it with: stap-authorize-signing-cert <certfile>",
        )
    if status in ("bad-signature", "module-altered"):
        return Decision(False, f"module {module_file} has been altered since it was signed{suffix}")
    if status != "valid" or manifest is None:
        return Decision(False, f"module {module_file} has an unusable signature{suffix}")
    if manifest.module_name != module_file:
        return Decision(
            False, f"module {module_file} was signed as {manifest.module_name!r}, not this name"
        )
    if (manifest.release, manifest.arch) != (host.release, host.arch):
        return Decision(
            False,
            f"module {module_file} was signed for {manifest.release} ({manifest.arch}), "
            f"not this host's {host.release} ({host.arch})",
        )
    signed_level = _LEVEL_BY_NAME.get(manifest.privilege)
    if signed_level is None or signed_level > level:
        return Decision(
            False,
            f"module {module_file} was signed for privilege {manifest.privilege!r}, "
            f"beyond {who}'s {level.name.lower()}",
        )
    return Decision(True, f"{who} may load {module_file}, signed for {manifest.privilege}")
