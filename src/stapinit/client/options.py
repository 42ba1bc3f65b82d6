"""``stap-client``'s command line: stap's options plus ``--server``.  Pure.

Like stap, options and operands may be mixed (``stap-client -e '...' -p4`` and
``stap-client script.stp -v`` both work) and ``--`` ends the options.  Without
``-e`` the first operand is the script file; remaining operands are the script's
arguments.
"""

from __future__ import annotations

import getopt
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from stapinit.core.errors import StapinitError
from stapinit.core.runtime import RuntimeKind
from stapinit.protocol import Privilege, ProtocolError, check_module_name
from stapinit.trust.address import AddressError, ServerAddress, parse_address

_SHORT: Final = "e:p:m:o:vI:r:h"
_LONG: Final = ("runtime=", "unprivileged", "privilege=", "server=", "help")

USAGE: Final = """\
usage: stap-client [OPTIONS] (-e SCRIPT | SCRIPT_FILE) [ARGS...]

Compile a SystemTap script on a trusted stap-server and, unless -p4 is given,
load and run the resulting module here.

  -e SCRIPT            run the script given on the command line
  -p4                  stop after compiling: save the module in the current
                       directory and print its name
  -m NAME              name the module NAME
  -o FILE              write the module's output to FILE
  -v                   more verbose (repeat for more)
  -I DIR               send the tapsets in DIR along with the script
  -r RELEASE           compile for kernel RELEASE (implies -p4 if not this kernel's)
  --runtime=bpf|kmod   the runtime to compile for
  --unprivileged       same as --privilege=stapusr
  --privilege=LEVEL    stapusr (the server checks and signs the module) or stapdev
  --server=HOST[:PORT] the server to use (default: those in client.conf, else
                       the local server at localhost:9740)
"""


class ClientUsageError(StapinitError):
    """The command line is wrong; ``str()`` is one line (exit 1, as stap's own)."""


@dataclass(frozen=True)
class ClientOptions:
    """What the user asked ``stap-client`` to do."""

    script_text: str | None = None
    script_file: str | None = None
    script_args: tuple[str, ...] = ()
    compile_only: bool = False
    module_name: str | None = None
    output_file: str | None = None
    verbose: int = 0
    include_dirs: tuple[str, ...] = ()
    runtime: RuntimeKind | None = None
    privilege: Privilege = "stapdev"
    release: str | None = None
    servers: tuple[ServerAddress, ...] = ()
    help: bool = False


def parse_server(text: str, default_port: int) -> ServerAddress:
    """Parse ``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT``; else ValueError (one line)."""
    try:
        return parse_address(text, default_port)
    except AddressError:
        raise
    except ValueError:  # a port of thousands of digits, which int() refuses
        raise AddressError(f"invalid port in server address {text[:80]!r}") from None


def _privilege(value: str) -> Privilege:
    if value == "stapusr":
        return "stapusr"
    if value == "stapdev":
        return "stapdev"
    if value == "stapsys":
        raise ClientUsageError("--privilege=stapsys is not supported by stap-server; use stapusr")
    raise ClientUsageError(f"invalid privilege level {value!r} (stapusr or stapdev)")


def _runtime(value: str) -> RuntimeKind:
    if value == "bpf":
        return "bpf"
    if value == "kmod":
        return "kmod"
    raise ClientUsageError(f"unsupported runtime {value!r} (bpf or kmod)")


def parse_args(argv: Sequence[str], default_port: int) -> ClientOptions:
    """Parse ``stap-client``'s arguments (without the program name)."""
    try:
        pairs, operands = getopt.gnu_getopt(list(argv), _SHORT, list(_LONG))
    except getopt.GetoptError as exc:
        raise ClientUsageError(str(exc)) from None
    opts = ClientOptions()
    includes: list[str] = []
    servers: list[ServerAddress] = []
    verbose = 0
    for opt, value in pairs:
        if opt == "-e":
            if opts.script_text is not None:
                raise ClientUsageError("-e given more than once")
            opts = replace(opts, script_text=value)
        elif opt == "-p":
            if value not in ("4", "5"):
                raise ClientUsageError(f"-p{value} is not supported (use -p4 to compile only)")
            opts = replace(opts, compile_only=value == "4")
        elif opt == "-m":
            try:
                opts = replace(opts, module_name=check_module_name(value))
            except ProtocolError as exc:
                raise ClientUsageError(str(exc)) from None
        elif opt == "-o":
            opts = replace(opts, output_file=value)
        elif opt == "-v":
            verbose += 1
        elif opt == "-I":
            includes.append(value)
        elif opt == "-r":
            opts = replace(opts, release=value)
        elif opt == "--runtime":
            opts = replace(opts, runtime=_runtime(value))
        elif opt == "--unprivileged":
            opts = replace(opts, privilege="stapusr")
        elif opt == "--privilege":
            opts = replace(opts, privilege=_privilege(value))
        elif opt == "--server":
            try:
                servers.append(parse_server(value, default_port))
            except ValueError as exc:
                raise ClientUsageError(str(exc)) from None
        else:  # -h, --help
            return ClientOptions(help=True)
    if opts.script_text is None:
        if not operands:
            raise ClientUsageError("no script given (use -e SCRIPT or name a script file)")
        opts = replace(opts, script_file=operands.pop(0))
    return replace(
        opts,
        script_args=tuple(operands),
        verbose=verbose,
        include_dirs=tuple(includes),
        servers=tuple(servers),
    )
