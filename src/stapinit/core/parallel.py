"""Running blocking work on several items at once, results in item order.

Threads, not processes: the work waits on other processes (stap, stapbpf,
staprun). Plain ``threading`` keeps ``concurrent.futures`` (and with it
``logging``) off the boot path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(work: Callable[[T], R], items: Sequence[T], jobs: int) -> list[R]:
    """``work(item)`` for every item, at most ``jobs`` at once; results in item order.

    ``work`` must not raise: it returns its failure as a value.
    """
    if len(items) <= 1 or jobs <= 1:
        return [work(item) for item in items]
    results: list[R | None] = [None] * len(items)
    lock = threading.Lock()
    pending = iter(range(len(items)))

    def worker() -> None:
        while True:
            with lock:
                index = next(pending, None)
            if index is None:
                return
            results[index] = work(items[index])

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(jobs, len(items)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results  # type: ignore[return-value]  # every index was filled
