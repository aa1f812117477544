"""A timeline of one process's KV-transfer events, for finding where a transfer's fixed time
goes (cluster/bench/bench_kv.py --timeline). Off unless KVRELAY_KV_TIMELINE=1 is in the
environment when this module is imported: `mark` then costs one attribute test.

Each mark is (name, time.perf_counter()); two processes of one host read the same clock, so
the bench lines up the sender's and the receiver's marks. Names start with "s." (sender) or
"r." (receiver).
"""

from __future__ import annotations

import os
import threading
import time

ENV = "KVRELAY_KV_TIMELINE"
ENABLED = os.environ.get(ENV) == "1"
_marks: list[tuple[str, float]] = []
_lock = threading.Lock()


def mark(name: str) -> None:
    """Records `name` now (a no-op unless enabled)."""
    if ENABLED:
        now = time.perf_counter()
        with _lock:
            _marks.append((name, now))


def take() -> list[tuple[str, float]]:
    """The marks recorded so far, oldest first; clears them."""
    global _marks
    with _lock:
        marks, _marks = _marks, []
    return marks
