"""``stap-server``: a compile server for SystemTap scripts, over TLS.

Modules: ``policy`` (which requests and stap options are accepted, pure),
``cache`` (cache keys, pure, and the content-addressed store), ``compiler`` (runs
the real ``stap -p4``), ``identity`` (key and certificate), ``config``, ``http``
(the HTTPS front end), ``service`` (pidfile, start/stop/status) and ``cli``.
"""
