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
    """Receiver -> sender about one transfer: kind 'ready' (torch path: recv posted, send now;
    cuda_ipc: reservation held, copy now) or 'ack' (data landed, or refused with a reason).
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
