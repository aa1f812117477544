"""Control messages of a KV-transfer pair (ZMQ DEALER -> ROUTER and back), msgpack-encoded by
workers/protocol.py. Data never travels in these: it follows as a raw frame (ZMQ path) or as
one torch.distributed send (NCCL/gloo path). TransferHeader lives in base.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.protocol import register


@register
@dataclass
class Hello:
    """Sender -> receiver, first contact of a pair (and after any teardown)."""

    sender_id: str
    layout: dict[str, Any]
    """Sender's KVLayout.to_dict()."""
    transport: str
    """'torch' (NCCL/gloo), 'zmq' or 'cuda_ipc'."""
    ipc: dict[str, Any] = field(default_factory=dict)
    """cuda_ipc: where the sender's caches are ({'device', 'host_id', 'gpu_uuid'}); the
    receiver refuses naming the field unless they are on its host and GPU."""
    probe_bytes: int = 0
    probe_rounds: int = 0
    """torch transport: the start-up probe both ranks run right after the warm-up (the
    receiver pre-posts `probe_rounds + 1` receives of `probe_bytes`)."""


@register
@dataclass
class HelloReply:
    """Receiver -> sender. The sender checks `layout` itself too (both ends refuse)."""

    layout: dict[str, Any]
    mismatch: list[Any] = field(default_factory=list)
    """[field, receiver's value, sender's value] when the receiver refused."""
    store_port: int = 0
    """torch transport: the receiver's TCPStore for this pair's communicator."""
    generation: int = 0
    ipc: dict[str, Any] = field(default_factory=dict)
    """cuda_ipc: the receiver's place plus CUDA IPC handles of its caches ('caches': per layer
    [K, V]) and of its probe buffer ('probe'), field by field (workers/kv_transfer/cuda_ipc.py)."""


@register
@dataclass
class Reply:
    """Receiver -> sender about one transfer: kind 'ready' (cuda_ipc: reservation held, copy
    now) or 'ack' (data landed, or refused with a reason).
    cuda_ipc also uses it sender -> receiver: kind 'written' (the copy finished, or failed)."""

    request_id: str
    kind: str
    ok: bool = True
    reason: str = ""


@register
@dataclass
class PairReport:
    """Sender -> receiver after the start-up probe, so both ends report the same path and
    bandwidth."""

    path: str
    gbps: float


@register
@dataclass
class StreamPart:
    """Sender -> receiver (torch transport), before the sends of one prefill step: which
    blocks of which requests this pair's sends carry, so the receiver pre-posts its receives
    in the same order. Per layer of the pair's plan, in layer order, the sends are each
    entry's runs (workers/kv_transfer/stream_plan.py), K then V per run; or staged packed
    buffers of all entries' blocks, `layers_per_message` layers each (`packed`)."""

    generation: int
    entries: list[Any]
    """[request_id, [[dest_first_block, num_blocks], ...]] per request in this step."""
    packed: bool = False
    """Staged messages (packed K and V of every entry's blocks) instead of the runs' views:
    the sender chose it (the plan is a head slice of either end, the blocks are too scattered
    for one message per run, or the runs' messages would be small; stream_plan.wire_plan)."""
    layers_per_message: int = 1
    """Packed: whole layers per staged message, in layer order (the last may hold fewer)."""


@register
@dataclass
class StreamEnd:
    """Sender -> receiver (torch transport): the request's last StreamPart has been sent
    (`parts` of them from this sender, covering `cells` (layer, kv head) cells). The receiver
    marks DONE once those parts have landed and every cell of its slice is covered, then
    acks each sender."""

    request_id: str
    generation: int
    parts: int
    cells: int
    extra: dict[str, Any] = field(default_factory=dict)


# ---- the driver rank and the other ranks of one worker (workers/kv_transfer/rank_*.py) ----
# Commands go driver -> ranks inside the worker's step broadcast (in order with the steps);
# notices go ranks -> driver over one ZMQ PUSH -> PULL.


@register
@dataclass
class RankSetup:
    """Builds the rank's end (role 'prefill': a TorchSender; 'decode': a Receiver) and tells
    it where to push notices."""

    role: str
    kv_transport: str
    host: str
    max_pairs: int
    notice_address: str
    sender_id: str


@register
@dataclass
class RankOpen:
    """Prefill: a transfer opened on the driver (`TorchSender.open` on each rank)."""

    request_id: str
    dest: str
    dest_block_ids: list[int]
    num_tokens: int | None
    timeout_s: float | None


@register
@dataclass
class RankSpans:
    """Prefill: the step that follows writes these prompt spans ([request_id, start, end,
    block_table] each); `fence` first orders the step after the posted sends."""

    spans: list[Any]
    fence: bool = False


@register
@dataclass
class RankFinish:
    """Prefill: token 1 is sampled: StreamEnd (with `extra`) on every pair of the request."""

    request_id: str
    extra: dict[str, Any] = field(default_factory=dict)


@register
@dataclass
class RankExpect:
    """Decode: the driver reserved these blocks (each rank's receiver expects its slice)."""

    request_id: str
    block_ids: list[int]
    timeout_s: float | None


@register
@dataclass
class RankAbort:
    """Either role: abort (and, prefill, forget) the request's transfer on the rank."""

    request_id: str
    forget_only: bool = False


@register
@dataclass
class RankConnect:
    """Prefill: set up the pairs with (group) address `dest` now."""

    dest: str


@register
@dataclass
class RankNotice:
    """Rank -> driver. kind 'ready' (set up; `address`: a decode rank's receiver), 'expected'
    (a RankExpect is registered), 'ended' (the rank's transfer is terminal: `state`,
    `reason`, its bytes and wire seconds) or 'quiet' (nothing touches its blocks any more)."""

    rank: int
    kind: str
    request_id: str = ""
    state: str = ""
    reason: str = ""
    num_bytes: int = 0
    seconds: float = 0.0
    address: str = ""
    peer_bytes: dict[str, int] = field(default_factory=dict)
