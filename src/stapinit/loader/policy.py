"""Who may load which module (spec §6.1.2, §6.1.3).  Pure: no I/O.

* root and members of ``stapdev`` may load any module;
* members of ``stapsys`` or ``stapusr`` only a module whose signature verifies
  against the signer store (made, and still, within the signer certificate's
  validity), that was signed for this host, and whose signed privilege level is
  within theirs; and no BPF module that probes user space, since stapbpf,
  unlike the kernel-module runtime, cannot limit such probes to the caller's
  own processes;
* anyone else may compile (``-p4``) but never load.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

from stapinit.trust.signing import Manifest, Reason

SignatureStatus = Literal["unsigned", "valid"] | Reason


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
    #: The primary group, when known (staprun is told it along with the uid).
    gid: int | None = None


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


def ordinary_refusal(name: str) -> str:
    """Why a user in none of the stap groups may not load anything (one line)."""
    return (
        f"user {name!r} is not root nor a member of stapdev, stapsys or stapusr, so may not "
        f"load modules; compile with -p4 to get the module without loading it"
    )


def must_check_user_space(caller: Caller, module_file: str) -> bool:
    """Whether ``module_file`` must be examined for user-space probes before ``caller`` runs it.

    stapbpf has no per-user filter, so a BPF module from a caller below stapdev
    may not probe user space at all.  (The kernel-module runtime limits a
    stapusr module to the processes of the user who loaded it.)
    """
    level = caller_level(caller.uid, caller.groups)
    return level is not None and level < Level.STAPDEV and module_file.endswith(".bo")


def may_load(
    caller: Caller,
    module_file: str,
    manifest: Manifest | None,
    status: SignatureStatus,
    host: Host,
    detail: str = "",
    user_space_probes: Sequence[str] = (),
) -> Decision:
    """Decide whether ``caller`` may load ``module_file``.

    ``status`` is the outcome of checking the module's signature against the signer
    store (``manifest`` is set only when it is ``valid``); ``detail`` is the
    checker's own explanation, appended to refusals.  ``user_space_probes`` are
    the module's programs that attach to user space (see
    :func:`must_check_user_space`).
    """
    who = f"user {caller.name!r}"
    level = caller_level(caller.uid, caller.groups)
    if level is None:
        return Decision(False, ordinary_refusal(caller.name))
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
    if status in ("signer-expired", "signer-not-yet-valid"):
        default = "has expired" if status == "signer-expired" else "is not yet valid"
        why = detail or f"the signer's certificate {default}"
        return Decision(False, f"module {module_file} could not be loaded: {why}")
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
            f"beyond {who}'s {level.name.lower()}; compile it with --unprivileged",
        )
    if user_space_probes and module_file.endswith(".bo"):
        return Decision(
            False,
            f"module {module_file} probes user space ({user_space_probes[0]}): user-space "
            f"probes are not allowed for unprivileged users under the BPF runtime",
        )
    return Decision(True, f"{who} may load {module_file}, signed for {manifest.privilege}")
