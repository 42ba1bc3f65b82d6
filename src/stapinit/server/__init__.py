"""``stap-server``: a compile server for SystemTap scripts, over TLS.

Modules, by job: ``config`` (the configuration file), ``errors`` (the command's
error and exit codes), ``protocol`` checks and ``policy`` (which requests and stap
options are accepted, pure), ``cache`` (cache keys, pure, and the
content-addressed store), ``sandbox`` (what a compile can see), ``compiler``
(runs the real ``stap -p4`` in it), ``identity`` (key and certificate), ``app``
(what a request does), ``httpd`` (the HTTPS front end and its connection
limits), ``directories`` (state, log and pid locations, prepared as root),
``account`` (the service user, dropping root), ``pidfile``, ``control``
(``status``, ``stop``), ``background`` (going to the background, reporting
readiness), ``logfile`` (the request log), ``serving`` (the serve loop and its
signals), ``startup`` (assembling and running) and ``cli``.
"""
