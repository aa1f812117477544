"""Routing policies: pure functions of the workers' loads (no Ray, no ZMQ, no clocks).

A policy orders the candidate workers for one request, best first; the router tries them in
that order (a decode worker may still refuse with NoCapacity, its free-block count being a few
hundred milliseconds old). Loads are snapshots the router keeps from its health polls plus its
own bookkeeping of what it has sent since.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class WorkerLoad:
    """What the router knows of one ready worker when it routes a request."""

    worker_id: str
    outstanding_tokens: int = 0
    """Prompt + max new tokens of the requests routed here and not yet finished."""
    num_requests: int = 0
    free_blocks: int = 0
    """Free KV blocks at the last poll, minus blocks reserved by the router since."""
    total_blocks: int = 0
    cached_tokens: int = 0
    """Leading tokens of this request whose KV the worker holds (the router's KV index);
    filled only for a policy with `uses_kv_index`."""


class RoutingPolicy(Protocol):
    name: str
    uses_kv_index: bool

    def order(self, candidates: Sequence[WorkerLoad], num_blocks_needed: int) -> list[str]:
        """Worker ids of `candidates`, best first (every candidate appears once)."""
        ...


def tie_ranks(tie_break: RoutingPolicy, candidates: Sequence[WorkerLoad]) -> dict[str, int]:
    """Each worker's place in `tie_break`'s order (the last key of a policy's sort)."""
    return {wid: i for i, wid in enumerate(tie_break.order(candidates, 0))}


class RoundRobin:
    """Cycles through the workers regardless of load: the fair, predictable baseline."""

    name = "round_robin"
    uses_kv_index = False

    def __init__(self) -> None:
        self._next = 0

    def order(self, candidates: Sequence[WorkerLoad], num_blocks_needed: int) -> list[str]:
        if not candidates:
            return []
        ids = sorted(w.worker_id for w in candidates)
        start = self._next % len(ids)
        self._next += 1
        return ids[start:] + ids[:start]


class LeastOutstandingTokens:
    """Least tokens still to process first; ties go round-robin so equal workers share load."""

    name = "least_tokens"
    uses_kv_index = False

    def __init__(self) -> None:
        self._tie_break = RoundRobin()

    def order(self, candidates: Sequence[WorkerLoad], num_blocks_needed: int) -> list[str]:
        rotation = tie_ranks(self._tie_break, candidates)
        ranked = sorted(
            candidates, key=lambda w: (w.outstanding_tokens, w.num_requests, rotation[w.worker_id])
        )
        return [w.worker_id for w in ranked]


class KvCapacityAware:
    """Decode pick: workers that can hold the request's blocks, most free blocks first.

    Workers that look full are still listed (last): their count may be stale, and a refusal
    costs one reserve call, while skipping them could refuse a request that fits.
    """

    name = "kv_capacity"
    uses_kv_index = False

    def __init__(self) -> None:
        self._tie_break = LeastOutstandingTokens()

    def order(self, candidates: Sequence[WorkerLoad], num_blocks_needed: int) -> list[str]:
        rank = tie_ranks(self._tie_break, candidates)
        fits = [w for w in candidates if w.free_blocks >= num_blocks_needed]
        full = [w for w in candidates if w.free_blocks < num_blocks_needed]
        fits.sort(key=lambda w: (-w.free_blocks, rank[w.worker_id]))
        full.sort(key=lambda w: (-w.free_blocks, rank[w.worker_id]))
        return [w.worker_id for w in fits + full]


class CacheAware:
    """Cached-prefix overlap against load (SGLang's router, Dynamo's KV router): a worker's
    cost is the tokens it has queued minus the prompt tokens it already holds, since every
    cached token is prefill work not done. Workers whose free blocks cannot hold the
    request go last (as kv_capacity; their count may be stale); ties go least-tokens, then
    round-robin. With no worker holding anything (or the index unavailable) this is
    least-tokens."""

    name = "cache_aware"
    uses_kv_index = True

    def __init__(self) -> None:
        self._tie_break = LeastOutstandingTokens()

    def order(self, candidates: Sequence[WorkerLoad], num_blocks_needed: int) -> list[str]:
        rank = tie_ranks(self._tie_break, candidates)
        ranked = sorted(candidates, key=lambda w: (
            w.free_blocks < num_blocks_needed, w.outstanding_tokens - w.cached_tokens,
            rank[w.worker_id]))
        return [w.worker_id for w in ranked]


POLICIES = {cls.name: cls for cls in (RoundRobin, LeastOutstandingTokens, KvCapacityAware,
                                      CacheAware)}


def make_policy(name: str) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name]()


def blocks_needed(num_prompt_tokens: int, block_size: int) -> int:
    """Blocks a decode worker reserves: the prompt plus one slot for the first token."""
    return (num_prompt_tokens + 1 + block_size - 1) // block_size
