"""Serving until told to stop: the accept loop in a thread, signals in the main thread."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from stapinit.server.logfile import LOG


def serve(serve_forever: Callable[[], None], shutdown: Callable[[], None]) -> bool:
    """Serve until SIGTERM or SIGINT, then run ``shutdown`` (from the main thread).

    Returns False when the accept loop died on its own.
    """
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    thread = threading.Thread(target=serve_forever, name="accept", daemon=True)
    thread.start()
    clean = True
    while not stopping.wait(0.5):
        if not thread.is_alive():
            LOG.error("the accept loop ended unexpectedly")
            clean = False
            break
    shutdown()
    return clean
