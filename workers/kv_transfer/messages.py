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
    """'torch' (NCCL/gloo) or 'zmq'."""


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


@register
@dataclass
class Reply:
    """Receiver -> sender about one transfer: kind 'ready' (torch path: recv posted, send now)
    or 'ack' (data landed, or refused with a reason)."""

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
