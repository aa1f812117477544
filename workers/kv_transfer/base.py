"""The KV sender/receiver contract (push variant, as SGLang's and vLLM's disaggregation).

The decode worker reserves blocks and calls `KVReceiver.expect(request_id, block_ids)`
(RESERVED). The router hands the ids and the receiver's address to the prefill worker, whose
`KVSender.send(...)` packs the prompt's blocks and pushes them (SENDING). The receiver writes
them into the reserved blocks, marks DONE and calls `on_done(request_id, header.extra)` so the
decode worker can `commit_remote`. Every transfer has a deadline and an `abort()`; each end
tracks its own state. While `in_flight(request_id)` is true the worker must not free (or reuse)
that request's blocks.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from workers.protocol import register

if TYPE_CHECKING:
    from workers.errors import KvrelayError
    from workers.kv_transfer.layout import KVLayout, TransferPlan
    from workers.kv_transfer.messages import Reply
    from workers.kv_transfer.pair_state import ReceiverPair, SenderPair
    from workers.kv_transfer.transfer_table import TransferRecord, TransferTable


class TransferState(str, enum.Enum):
    RESERVED = "reserved"
    """Receiver: blocks reserved, waiting for data. Sender: queued, not yet on the wire."""
    SENDING = "sending"
    """Data is moving; blocks on both ends are referenced."""
    DONE = "done"
    FAILED = "failed"
    """Peer error, stale pair or deadline passed; blocks may be freed."""
    ABORTED = "aborted"
    """`abort()` was called; blocks may be freed."""

    @property
    def terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED, TransferState.ABORTED)


OnDone = Callable[[str, dict], None]
"""(request_id, header.extra), called once when a transfer reaches DONE."""
OnFailed = Callable[[str, "TransferState", str], None]
"""(request_id, FAILED or ABORTED, reason), called once when a transfer ends without data."""


@register
@dataclass
class TransferHeader:
    """Sender -> receiver (control channel), ahead of the packed data of one transfer.

    The data is the plan's layers x kv heads of `num_blocks` blocks, packed K-then-V per layer
    (workers/kv_transfer/packing.py), `num_bytes` long (zmq: one frame; cuda_ipc: copied by
    the sender). The torch transport streams instead (StreamPart / StreamEnd).
    """

    request_id: str
    src_layout: dict[str, Any]
    """Sender's KVLayout.to_dict(); the receiver recomputes the plan from it."""
    dest_block_ids: list[int]
    """The receiver's reserved blocks; the first `num_blocks` are written."""
    num_blocks: int
    num_bytes: int
    dtype: str
    extra: dict[str, Any] = field(default_factory=dict)
    """Opaque to transfer; e.g. {'first_token_id': 42}. Handed to the receiver's on_done."""
    num_tokens: int = 0
    """Prompt tokens whose KV the blocks hold (the last block may be partly filled)."""
    generation: int = 0
    """The pair's generation this transfer uses (stale ones are refused)."""


def header_refusal(record: TransferRecord | None, header: TransferHeader,
                   plan: TransferPlan | None, layout: KVLayout, handshake: KVLayout) -> str:
    """Why the receiver (`layout`, whose pair shook hands on `handshake`) cannot accept this
    header, or '' if it can."""
    if record is None or record.state.terminal:
        state = record.state.value if record else "unknown"
        return f"no reservation for {header.request_id!r} (state {state})"
    if plan is None:
        return "sender and receiver share no layer/head"
    n = header.num_blocks
    if header.dest_block_ids[:n] != record.block_ids[:n] or n > len(record.block_ids):
        return f"destination blocks {header.dest_block_ids[:n]} are not the reserved " \
               f"{record.block_ids[:n]}"
    want = plan.num_bytes(layout, n)
    if header.num_bytes != want:
        return f"{header.num_bytes} bytes for {n} blocks; expected {want}"
    if header.src_layout != handshake.to_dict() or header.dtype != layout.dtype:
        return f"header layout {header.src_layout} ({header.dtype}) is not the handshake's"
    return ""


class WholeSending(Protocol):
    """Sender half of a transport that moves a prefilled request whole behind a
    TransferHeader (zmq_transport.ZmqSending, cuda_ipc.IpcSending); runs on the pair's
    thread, which owns `pair.sock`."""

    path: str

    def push(self, pair: SenderPair, plan: TransferPlan, record: TransferRecord,
             header: TransferHeader, ready) -> Reply:
        """Moves the blocks `record.block_ids` (after CUDA event `ready`) into
        `header.dest_block_ids`; returns the receiver's final reply (ok, or why not)."""

    def probe(self, pair: SenderPair, bytes_: int, rounds: int, deadline: float) -> float | None:
        """GB/s of the pair's start-up probe (None: not measured)."""


class WholeReceiving(Protocol):
    """Receiver half of such a transport (zmq_transport.ZmqReceiving,
    cuda_ipc.IpcReceiving); runs on the pair's thread once the header was accepted."""

    def receive(self, peer: ReceiverPair, record: TransferRecord, header: TransferHeader,
                plan: TransferPlan, frame) -> None:
        """Lands the data in the reserved blocks (table.add_part) and acks, or refuses it
        (the transfer was aborted meanwhile); every outcome is replied to the sender."""


class _TransferEnd(ABC):
    """What sender and receiver share: a table of per-transfer state with deadlines."""

    table: TransferTable

    def state(self, request_id: str) -> TransferState | None:
        """Current state, or None if this end never saw the request (or forgot it long ago)."""
        record = self.table.get(request_id)
        return record.state if record else None

    def in_flight(self, request_id: str) -> bool:
        """True while the request's blocks are referenced by a transfer (RESERVED or SENDING):
        the worker must not free them."""
        return self.table.in_flight(request_id)

    def error(self, request_id: str) -> KvrelayError | None:
        """Why a FAILED transfer failed, typed (TransferTimeout, HandshakeMismatch,
        TransferFailed), for the worker's error chunk; None otherwise."""
        record = self.table.get(request_id)
        return record.error if record else None

    def wait(self, request_id: str, timeout_s: float | None = None) -> TransferState | None:
        """Blocks until the transfer is terminal (or timeout_s passes); returns its state."""
        return self.table.wait(request_id, timeout_s)

    def abort(self, request_id: str) -> None:
        """Ends the transfer (ABORTED) if still in flight; idempotent. Data that lands later
        for it is dropped. The blocks may be freed once `when_quiet` says so."""
        self.table.end(request_id, TransferState.ABORTED, "aborted")

    def when_quiet(self, request_id: str, fn: Callable[[], None]) -> None:
        """Runs `fn()` once the transfer is terminal and nothing touches its blocks any more:
        at once if so (most transports: right after `abort`), or later from a transfer
        thread (the torch stream's posted sends/receives cannot be recalled; they end when
        the data has moved or the pair is torn down). Free the blocks in `fn`."""
        self.table.when_quiet(request_id, fn)

    @abstractmethod
    def path(self, peer: str) -> str | None:
        """'nccl', 'gloo', 'zmq', 'cuda_ipc' or 'inprocess' for a started pair; None before
        first contact."""

    @abstractmethod
    def bandwidth(self, peer: str) -> float | None:
        """GB/s measured by the pair's start-up probe; None before first contact."""

    @abstractmethod
    def close(self) -> None:
        """Stops threads, closes sockets and communicators. Idempotent."""


@dataclass
class OpenTransfer:
    """A transfer opened before its prefill ran: where its KV goes."""

    dest: str
    dest_block_ids: list[int]
    num_tokens: int | None
    timeout_s: float | None


class KVSender(_TransferEnd):
    """Prefill side: pushes one request's KV blocks into a receiver's reserved blocks.

    Two ways in. `send` moves a prefilled request whole. A worker instead `open`s the
    transfer when the prefill is queued, hands `stream_hook()` to its engine (streaming
    transports move each layer's blocks while the prefill runs; others return None and
    move everything at `finish`), and calls `finish` once token 1 is sampled.
    """

    def connect(self, dest: str) -> None:
        """Sets up the pair with receiver `dest` now, in the background (worker start or
        join), so no request waits for a handshake. Idempotent."""

    def open(self, request_id: str, dest: str, dest_block_ids: list[int],
             num_tokens: int | None = None, timeout_s: float | None = None) -> None:
        """Registers a transfer whose prefill is about to run."""
        opened = self.__dict__.setdefault("_opened", {})
        opened[request_id] = OpenTransfer(dest, list(dest_block_ids), num_tokens, timeout_s)

    def stream_hook(self):
        """The engine's `kv_stream` (before_step / layer_done), or None: no streaming."""
        return None

    def finish(self, request_id: str, src_block_ids: list[int], extra: dict | None = None,
               num_tokens: int | None = None) -> None:
        """Token 1 is sampled: completes an `open`ed transfer (here: sends it whole)."""
        opened = self.__dict__.get("_opened", {}).pop(request_id)
        self.send(request_id, opened.dest, src_block_ids, opened.dest_block_ids, extra,
                  num_tokens if num_tokens is not None else opened.num_tokens,
                  opened.timeout_s)

    def forget(self, request_id: str) -> None:
        """Drops an `open`ed transfer that will never finish (aborted before token 1)."""
        self.__dict__.get("_opened", {}).pop(request_id, None)

    @abstractmethod
    def send(self, request_id: str, dest: str, src_block_ids: list[int],
             dest_block_ids: list[int], extra: dict | None = None,
             num_tokens: int | None = None, timeout_s: float | None = None) -> None:
        """Queues the transfer and returns at once (state RESERVED, then SENDING, then terminal).

        `dest` is the receiver's `address`. `num_tokens` (default: all of src_block_ids) limits
        the blocks sent to ceil(num_tokens / block_size). Raises `HandshakeMismatch` only through
        the failure reason (the transfer ends FAILED); `wait()` to learn the outcome.
        """


def blocks_to_send(block_size: int, num_tokens: int | None, src_block_ids: list[int],
                   dest_block_ids: list[int]) -> int:
    """How many leading blocks a `send` moves: ceil(num_tokens / block_size), all of the source
    when num_tokens is None. Raises ValueError when either side has too few blocks."""
    if num_tokens is None:
        num_tokens = len(src_block_ids) * block_size
    num_blocks = -(-num_tokens // block_size)
    if not 0 < num_blocks <= min(len(src_block_ids), len(dest_block_ids)):
        raise ValueError(f"{num_tokens} tokens need {num_blocks} blocks; "
                         f"{len(src_block_ids)} source, {len(dest_block_ids)} destination")
    return num_blocks


class KVReceiver(_TransferEnd):
    """Decode side: owns an address senders push to, writes into reserved blocks."""

    address: str
    """Where senders connect (from config, bound at construction)."""

    @abstractmethod
    def expect(self, request_id: str, block_ids: list[int],
               timeout_s: float | None = None) -> None:
        """Registers reserved blocks for a request (RESERVED) with a deadline for its data."""
