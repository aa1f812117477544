"""Admission control at the gateway: a limit on requests in flight, refused with 429.

A request counts from admission until its last byte is sent (or it is aborted). Past
`max_in_flight` the gateway refuses at once with `QueueFull(retry_after)` rather than letting
an unbounded queue grow latency for everyone. Retry-After estimates when a slot frees: the
recent mean request latency, scaled by how far over the limit the gateway is.

Pure bookkeeping for one event loop (no locks: asyncio runs one callback at a time).
"""

from __future__ import annotations

from workers.errors import QueueFull

# Weight of the newest latency in the running mean: ~the last 20 requests matter.
_EWMA_ALPHA = 0.05


class Admission:
    """Counts requests in flight; `admit()` raises `QueueFull` past the limit.

    Every successful `admit()` must be paired with exactly one `release()`.
    `max_in_flight` 0 means no limit.
    """

    def __init__(self, max_in_flight: int, initial_latency_s: float = 1.0):
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.refused = 0
        self.mean_latency_s = initial_latency_s

    def admit(self) -> None:
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            self.refused += 1
            raise QueueFull(self.retry_after(), self.in_flight, self.max_in_flight)
        self.in_flight += 1

    def release(self, latency_s: float | None = None) -> None:
        """Frees a slot; `latency_s` (admission to end) of a completed request refines the
        Retry-After estimate; aborted or failed requests pass None."""
        if self.in_flight <= 0:
            raise RuntimeError("release() without a matching admit()")
        self.in_flight -= 1
        if latency_s is not None:
            self.mean_latency_s += _EWMA_ALPHA * (latency_s - self.mean_latency_s)

    def retry_after(self) -> float:
        """Seconds until a slot is likely free: requests finish about one mean latency
        apart per slot, so one slot frees within mean_latency / max_in_flight on average;
        never less than one second (clients round up anyway)."""
        if not self.max_in_flight:
            return 1.0
        per_slot = self.mean_latency_s / self.max_in_flight
        excess = self.in_flight - self.max_in_flight + 1
        return max(1.0, per_slot * excess)
