"""What the router keeps: its config, per-worker state and per-request entries (each with its
RequestLife, router/lifecycle.py). Plain data; RouterCore (router_core.py) acts on it."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.lifecycle import Event, RequestLife
from router.worker_handle import WorkerHandle
from workers.errors import InvalidParameter
from workers.protocol import GenerateRequest


@dataclass(frozen=True)
class RouterConfig:
    max_queue: int = 1024
    """Most requests in flight; more are refused with QueueFull."""
    prefill_policy: str = "least_tokens"
    decode_policy: str = "kv_capacity"
    colocated_policy: str = "least_tokens"
    block_size: int = 16
    poll_interval_s: float = 0.2
    """How often each worker's health and load are checked (its news is pushed as it
    happens, router/worker_news.py)."""
    poll_timeout_s: float = 2.0
    """A worker whose health check takes longer is treated as lost."""
    news_host: str = "127.0.0.1"
    """Where the router binds the socket workers push their news to (the Router actor binds
    on its node's address)."""
    capacity_wait_s: float = 10.0
    """How long submit waits for a decode worker with free blocks before NoCapacity."""
    local_prefill_max_tokens: int = 0
    """Conditional disaggregation: a prompt of at most this many tokens is prefilled by the
    decode worker itself (a short prefill costs less than a transfer); 0: always remote.
    A prompt whose uncached part (after the best decode worker's cached prefix) is this
    short counts as short."""
    max_prefill_queue_tokens: int = 0
    """Conditional disaggregation by queue state: when every prefill worker has at least
    this many tokens queued, a decode worker prefills the request itself; 0: never."""
    max_migrations: int = 2
    """How many lost workers one request may survive by migrating to a live one
    (router/migration.py); 0 (`kvrelay serve --no-migration`): it ends with WorkerLost."""
    resume_timeout_s: float = 10.0
    """How long a migrating request waits for its gateway's continuation before it fails
    (the Resume, or the gateway, was lost)."""
    rescan_interval_s: float = 2.0
    """With a shared control plane: how often the router rescans the cluster's live workers
    to admit new ones and let gone ones leave (router/membership.py, `watch`)."""

    def __post_init__(self) -> None:
        if not self.rescan_interval_s > 0:
            raise InvalidParameter("rescan_interval_s", f"{self.rescan_interval_s}: the "
                                   "interval between rescans of the workers (--rescan-interval) "
                                   "must be > 0 s")


@dataclass
class WorkerState:
    handle: WorkerHandle
    role: str
    incarnation: str = ""
    ready: bool = False
    free_blocks: int = 0
    total_blocks: int = 0
    requests: set[str] = field(default_factory=set)
    kv_address: str | None = None
    """Decode workers: their KV receiver, which prefill workers pair with on admission."""


@dataclass
class InFlight:
    request: GenerateRequest
    """The current attempt's request (a continuation after a migration)."""
    life: RequestLife
    """Where the request is in its life and which workers hold it."""
    tokens: int
    """Prompt + max new tokens, for the least-tokens policy."""
    blocks: int = 0
    """Blocks the KV of the known tokens takes (prompt, and a continuation's output)."""
    lost_at: float | None = None
    """time.monotonic() when its last migration began."""
    early_news: list[Event] = field(default_factory=list)
    """Worker news that came before placement recorded that worker (router_core.py)."""

    @property
    def request_id(self) -> str:
        return self.request.request_id
