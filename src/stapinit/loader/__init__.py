"""``stap-loader``: the root service that loads modules for non-root users (spec §6.1.2).

Nobody but root may load a module; ``stap-client`` is not setuid, so a member of
``stapdev`` or ``stapusr`` hands the module to this service over a Unix socket.  The
service learns who is asking from the kernel, decides with :mod:`.policy`, and runs
the real ``stapbpf`` or ``staprun``.
"""
