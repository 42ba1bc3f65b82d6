"""What stap-server accepts from a client, and the stap command line it runs.

Pure logic, no I/O.  Client options are parsed the way stap's own ``getopt_long``
would (bundled short flags, attached or separate values) against an allow-list,
and re-emitted in one canonical spelling, so stap sees exactly what was checked.
Anything that names a path on the server, runs a command on it, or would lift the
``stapusr`` safety check is refused with a one-line message.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePosixPath
from typing import Final

from stapinit.core.runtime import MODULE_SUFFIX, RuntimeKind
from stapinit.protocol import MODULE_NAME_RE, CompileRequest


class PolicyError(ValueError):
    """A request the server refuses; ``str()`` is the one-line reason for the client."""


class _Arg(Enum):
    NONE = "none"
    REQUIRED = "required"
    OPTIONAL = "optional"  # long options only, value attached with '='


class _Allowed(Enum):
    ALL = "all"
    STAPDEV = "stapdev"  # refused under --privilege=stapusr
    FIELD = "field"  # the request has a field of its own for it


@dataclass(frozen=True)
class _Spec:
    arg: _Arg
    allowed: _Allowed
    value_re: str | None = None  # full-match pattern for the value, if restricted


#: Options that change only what stap prints, never the module: they reach stap
#: but not the signature, as they are not in a cache record (phase ``REPORT`` of
#: :mod:`stapinit.initscript.options`, which a test holds to this set).
REPORT_ONLY: Final = frozenset({"-v", "-w", "-q", "--vp", "--check-version"})


_NUM = r"[0-9]{1,9}"
_SHORT: Final[dict[str, _Spec]] = {
    **{c: _Spec(_Arg.NONE, _Allowed.ALL) for c in "vwWutPbq"},
    "s": _Spec(_Arg.REQUIRED, _Allowed.ALL, _NUM),
    "T": _Spec(_Arg.REQUIRED, _Allowed.ALL, _NUM),
    "G": _Spec(_Arg.REQUIRED, _Allowed.ALL, r"[A-Za-z_][A-Za-z0-9_]*=.*"),
    "E": _Spec(_Arg.REQUIRED, _Allowed.ALL),
    "g": _Spec(_Arg.NONE, _Allowed.STAPDEV),
    "D": _Spec(_Arg.REQUIRED, _Allowed.STAPDEV, r"[A-Za-z_][A-Za-z0-9_]*(=.*)?"),
    **{c: _Spec(_Arg.REQUIRED, _Allowed.FIELD) for c in "eIrpma"},
}
_LONG: Final[dict[str, _Spec]] = {
    "vp": _Spec(_Arg.REQUIRED, _Allowed.ALL, r"[0-9]{1,5}"),
    "runtime": _Spec(_Arg.REQUIRED, _Allowed.ALL, r"kmod|bpf"),
    "bpf": _Spec(_Arg.NONE, _Allowed.ALL),
    "prologue-searching": _Spec(_Arg.OPTIONAL, _Allowed.ALL, r"[a-z]{1,16}"),
    "compatible": _Spec(_Arg.REQUIRED, _Allowed.ALL, r"[0-9]{1,4}(\.[0-9]{1,4}){0,3}"),
    "check-version": _Spec(_Arg.NONE, _Allowed.ALL),
    "skip-badvars": _Spec(_Arg.NONE, _Allowed.ALL),
    "suppress-handler-errors": _Spec(_Arg.NONE, _Allowed.ALL),
    "suppress-time-limits": _Spec(_Arg.NONE, _Allowed.STAPDEV),
    "modinfo": _Spec(_Arg.REQUIRED, _Allowed.STAPDEV, r"[A-Za-z_][A-Za-z0-9_]*=.*"),
    "privilege": _Spec(_Arg.REQUIRED, _Allowed.FIELD),
    "unprivileged": _Spec(_Arg.NONE, _Allowed.FIELD),
}
#: Options that stap itself refuses from a client under --privilege=stapusr; named
#: here so the client gets stap's wording even for options this server never takes.
#: The file (in the compile directory) that holds an ``-e`` script; stap reads it
#: on standard input.  Not a name a module file (``NAME.ko``/``NAME.bo``) can take.
EVAL_SCRIPT_FILE: Final = "eval.stp"
STAPUSR_FORBIDDEN: Final = frozenset(
    {"-g", "-B", "-D", "-R", "-m", "-I", "--tmpdir", "--modinfo", "--suppress-time-limits"}
)


@dataclass(frozen=True)
class ParsedOptions:
    """Client options after checking: canonical stap options, script arguments, runtime.

    ``signed`` are the options the module's signature covers: the client's
    words, less the :data:`REPORT_ONLY` options (their letters are taken out of
    a cluster: ``-vu`` is signed as ``-u``) and the runtime selection (the
    manifest has a field for it). They are what a client's cache record
    holds, so a report-only option changes neither the signature nor whether
    the cache is valid.
    """

    options: tuple[str, ...]
    script_args: tuple[str, ...]
    runtime: RuntimeKind
    signed: tuple[str, ...]


def stapusr_refusal(option: str) -> str:
    """stap's own wording for an option refused under --privilege=stapusr."""
    return f"You can't specify {option} when --privilege=stapusr is specified."


def _accept(option: str, spec: _Spec | None, stapusr: bool) -> _Spec:
    """Return the spec of an option the client may give, else raise PolicyError."""
    if stapusr and (option in STAPUSR_FORBIDDEN or (spec and spec.allowed is _Allowed.STAPDEV)):
        raise PolicyError(stapusr_refusal(option))
    if spec is None:
        raise PolicyError(f"option {option} is not accepted by this server")
    if spec.allowed is _Allowed.FIELD:
        raise PolicyError(
            f"option {option} must not be among the options: the request has a field for it"
        )
    return spec


def _check_value(option: str, spec: _Spec, value: str) -> str:
    if value == "" or (spec.value_re is not None and not re.fullmatch(spec.value_re, value)):
        raise PolicyError(f"invalid value {value!r} for option {option}")
    return value


def parse_compile_options(
    options: Sequence[str], stapusr: bool, runtime: RuntimeKind
) -> ParsedOptions:
    """Check client options as stap's getopt would read them; raise PolicyError.

    ``runtime`` is the request's field; ``--runtime=bpf`` or ``--bpf`` among the
    options also selects BPF (and is then emitted by :func:`stap_command` instead).
    """
    out: list[str] = []
    args: list[str] = []
    signed: list[str] = []
    i = 0
    while i < len(options):
        start, word = i, options[i]
        i += 1
        if not word.startswith("-") or word == "-":
            if word == "-":
                raise PolicyError("a script on standard input ('-') is not accepted")
            args.append(word)
            signed.append(word)  # compiled into the module as @1, @2...
            continue
        if word.startswith("--"):
            name, eq, attached = word[2:].partition("=")
            option = f"--{name}"
            spec = _accept(option, _LONG.get(name), stapusr)
            if spec.arg is _Arg.NONE:
                if eq:
                    raise PolicyError(f"option {option} takes no value")
                value = None
            elif eq:
                value = _check_value(option, spec, attached)
            elif spec.arg is _Arg.REQUIRED:
                if i >= len(options):
                    raise PolicyError(f"option {option} needs a value")
                value = _check_value(option, spec, options[i])
                i += 1
            else:
                value = None
            if name == "bpf" or (name == "runtime" and value == "bpf"):
                runtime = "bpf"
            elif name != "runtime":
                out.append(option if value is None else f"{option}={value}")
                if option not in REPORT_ONLY:
                    signed += options[start:i]
            continue
        # A cluster of short options: "-vv", "-vs4", "-Dname=1".
        pos = 1
        kept = "-"  # the cluster as signed: without its report-only letters
        while pos < len(word):
            letter = word[pos]
            pos += 1
            option = f"-{letter}"
            spec = _accept(option, _SHORT.get(letter), stapusr)
            if option not in REPORT_ONLY:
                kept += letter
            if spec.arg is _Arg.NONE:
                out.append(option)
                continue
            if pos < len(word):
                value = word[pos:]
                kept += value
            elif i < len(options):
                value = options[i]
                i += 1
            else:
                raise PolicyError(f"option {option} needs a value")
            # Attached form: stap cannot mistake the value for another option.
            out.append(option + _check_value(option, spec, value))
            break
        if kept != "-":
            signed += [kept, *options[start + 1 : i]]
    return ParsedOptions(tuple(out), tuple(args), runtime, tuple(signed))


#: The start of a header name in a string: stap builds a type module from
#: ``@cast(p, "type", "<header>")``, ``"kernel<header>"`` or ``"mod:<header>"``
#: (and likewise ``@enumname``) by having gcc include that file (stap's
#: ``make_typequery``; header names match ``[a-zA-Z0-9/_.+-]+``).  A fragment
#: ending in ``<`` counts too, since stap joins adjacent literals.
_HEADER_START: Final = re.compile(r"<(?:[A-Za-z0-9/_.+-]|\Z)")


def string_literals(script: str) -> list[str]:
    """The contents of the string literals of a stap script, escapes kept as written.

    Read as stap's lexer reads them (``lexer::scan``): comments (``#``, ``//``,
    ``/* */``) and embedded C (``%{ %}``) are skipped; a backslash takes the
    next character along (even a newline); an unescaped newline ends an
    unterminated literal.  stap keeps escapes undecoded in strings
    (``"\\074"`` is not ``<``), so neither are they decoded here.
    """
    found: list[str] = []
    i, end = 0, len(script)
    while i < end:
        char = script[i]
        if char == '"':
            j = i + 1
            while j < end and script[j] not in '"\n':
                j += 2 if script[j] == "\\" else 1
            found.append(script[i + 1 : min(j, end)])
            i = j + 1
        elif char == "#" or script.startswith("//", i):
            newline = script.find("\n", i)
            i = end if newline < 0 else newline + 1
        elif script.startswith("/*", i) or script.startswith("%{", i):
            close = script.find("*/" if char == "/" else "%}", i + 2)
            i = end if close < 0 else close + 2
        else:
            i += 1
    return found


def header_refusal(req: CompileRequest, parsed: ParsedOptions) -> str | None:
    """Why a stapusr request might name a header file for gcc to include; None if not.

    Looks at every string the script (``-e``/file and ``-E`` texts) and its
    arguments (``@1``...) can hand to ``@cast``: literals, macros and
    ``%( %? %)`` branches all appear as literals in the text.  Plain ``<``
    in a literal (``"a < b"``, ``"<%d>"``) is fine; in an argument it is not.
    """
    extra = [opt[2:] for opt in parsed.options if opt.startswith("-E")]
    strings = [s for text in (req.script_text, *extra) for s in string_literals(text)]
    for text in [*strings, *parsed.script_args]:
        # An argument is spliced in as tokens ($1 may be '"<"', quotes and all,
        # next to other literals): any '<' in one is refused.
        if _HEADER_START.search(text) or (text in parsed.script_args and "<" in text):
            return (
                'header files (@cast(..., "<file>") or "kernel<file>") are not allowed '
                f"under --privilege=stapusr; refused for the string {text[:80]!r} "
                "('<' followed by a file name)"
            )
    return None


def check_request(req: CompileRequest, releases: Sequence[str], arch: str) -> ParsedOptions:
    """Apply the server's policy to a (protocol-valid) request; raise PolicyError."""
    if req.release not in releases:
        raise PolicyError(
            f"kernel release {req.release} is not supported by this server; "
            f"it compiles for: {', '.join(releases) or '(none)'}"
        )
    if req.arch != arch:
        raise PolicyError(
            f"architecture {req.arch} is not supported by this server; it compiles for: {arch}"
        )
    stapusr = req.privilege == "stapusr"
    if stapusr and req.module_name is not None:
        raise PolicyError(stapusr_refusal("-m"))
    if stapusr and req.tapsets:
        # stap trusts "/* unprivileged */" embedded C in tapset files, so a client's
        # own tapsets would lift the safety check (stap refuses -I likewise).
        raise PolicyError(stapusr_refusal("-I"))
    parsed = parse_compile_options(req.options, stapusr, req.runtime)
    refusal = header_refusal(req, parsed) if stapusr else None
    if refusal is not None:
        raise PolicyError(refusal)
    return parsed


def stap_command(
    stap: str,
    req: CompileRequest,
    parsed: ParsedOptions,
    tapset_dir: str | None,
) -> list[str]:
    """The stap argument list for a checked request (run in the compile directory).

    A script file is expected under its own name in the working directory.  An
    ``-e`` script is not put on the command line (one argument may not exceed
    128 KiB): it is read from standard input (``-``), which stap treats exactly
    like ``-e`` (the same module bytes, ``<input>`` in messages); the caller
    supplies it there from the file :data:`EVAL_SCRIPT_FILE`.  Script arguments
    follow ``--`` so stap never reads them as options.
    """
    argv = [stap, *parsed.options]
    if parsed.runtime == "bpf":
        argv.append("--runtime=bpf")
    # --disable-cache: stap 5 would otherwise leave a kernel module in its own
    # cache and print that path; each compile has a fresh directory anyway.
    argv += ["-p4", "--disable-cache", "-r", req.release]
    if req.privilege == "stapusr":
        argv.append("--privilege=stapusr")
    if req.module_name is not None:
        argv += ["-m", req.module_name]
    if tapset_dir is not None:
        argv += ["-I", tapset_dir]
    if req.eval:
        argv += ["--", "-"]
    else:
        assert req.script_name is not None  # the protocol guarantees it
        argv += ["--", req.script_name]
    return [*argv, *parsed.script_args]


def module_file_name(stdout: str, module_name: str | None, runtime: RuntimeKind) -> str | None:
    """Name of the module stap -p4 wrote, from the request or from stap's stdout.

    stap prints the module's file name as the last line of its output at pass 4.
    Returns None when nothing trustworthy names one.
    """
    suffix = MODULE_SUFFIX[runtime]
    if module_name is not None:
        return module_name + suffix
    lines = stdout.strip().splitlines()
    if not lines:
        return None
    name = lines[-1].strip()
    if (
        PurePosixPath(name).name != name
        or not name.endswith(suffix)
        or not MODULE_NAME_RE.fullmatch(name[: -len(suffix)])
    ):
        return None
    return name
