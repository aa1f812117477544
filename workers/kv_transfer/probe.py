"""The start-up bandwidth probe every KV-transfer pair runs, so a slow path is visible at once
(logged, and exposed as `bandwidth(peer)` on both ends)."""

from __future__ import annotations

import time
from collections.abc import Callable


def measure_gbps(one_round: Callable[[int], None], num_bytes: int, rounds: int) -> float:
    """Runs `one_round(i)` once to warm up, then `rounds` timed times; returns the best GB/s
    (1e9 bytes per second) of a round that moves `num_bytes`."""
    one_round(0)
    best = float("inf")
    for i in range(1, max(rounds, 1) + 1):
        start = time.perf_counter()
        one_round(i)
        best = min(best, time.perf_counter() - start)
    return num_bytes / max(best, 1e-9) / 1e9
