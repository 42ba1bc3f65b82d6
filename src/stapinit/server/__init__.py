"""``stap-server``: a compile server for SystemTap scripts, over TLS.

Modules: ``policy`` (which requests and stap options are accepted, pure),
``cache`` (cache keys, pure, and the content-addressed store), ``compiler`` (runs
the real ``stap -p4``), ``identity`` (key and certificate), ``config``, ``app``
(what a request does), ``httpd`` (the HTTPS front end), ``service`` (pid file,
status, stop, daemonizing), ``daemon`` (assembling and running) and ``cli``.
"""
