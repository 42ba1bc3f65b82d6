"""``stap-loader``: the root service that loads modules for non-root users (spec §6.1.2).

Nobody but root may load a module; ``stap-client`` is not setuid, so a member of
``stapdev`` or ``stapusr`` hands the module to this service over a Unix socket.

Modules, by job: :mod:`.cli` (command line, logging, signals), :mod:`.config`
(its file), :mod:`.listener` (the socket), :mod:`.sessions` (admission and one
session per connection), :mod:`.callers` (who is asking, from the kernel),
:mod:`.spool` (receiving a module into a private file within a shared
budget), :mod:`.verdict` (signature check, then :mod:`.policy`, which is
pure), :mod:`.runner` (running ``stapbpf``/``staprun`` and streaming its
output). The protocol it shares with the client is :mod:`stapinit.loader_wire`.
"""
