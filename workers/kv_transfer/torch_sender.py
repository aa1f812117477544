"""Prefill side of the torch transport (NCCL between GPUs, gloo on CPU): KV streamed layer
by layer while the prefill runs.

Per destination one pair (torch_pairs.py: a ZMQ DEALER for control and a two-rank communicator
built eagerly when the pair is set up, at worker start or join). Per prefill step the engine
thread
- `before_step`: announces the step's blocks to each receiver (StreamPart), which pre-posts
  its receives straight into the reserved blocks;
- `layer_done(i)`: posts layer i's sends as one grouped call, ordered after layer i's
  compute on the engine's stream, so the wire time hides under the remaining layers; where
  the runs' messages would be small (or scattered, or a head slice), K and V of the layer go
  as one staged message instead, packed on a side stream (stream_plan.wire_plan);
- `finish`: after token 1, sends StreamEnd (token 1 rides in it); the receiver acks DONE.
A prefilled request sent whole (`send`) is one such step: its StreamPart and StreamEnd leave
together before any send is posted, and below TransferConfig.coalesce_whole_below_bytes (1 MiB
messages on CUDA) all its layers go as one staged message: one post per end instead of
2 x layers (the fixed part of a small request's transfer; bench_kv --timeline shows it).
The pairs' control thread turns acks into transfer states and watches the posted sends
(blocks stay pinned until they end) and the deadlines; a stuck pair is torn down, which ends
its sends.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from workers.errors import HandshakeMismatch
from workers.kv_transfer.base import KVSender, OnDone, OnFailed, TransferState, blocks_to_send
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.layout import KVLayout, TransferPlan
from workers.kv_transfer.messages import StreamEnd, StreamPart
from workers.kv_transfer.packing import (
    CopyStream,
    KVCaches,
    as_bytes,
    one_launch,
    pack,
    record_event,
)
from workers.kv_transfer.pair_group import PairGroup, op_timeout
from workers.kv_transfer.posted import Posted, PostedOps
from workers.kv_transfer.rank_routes import SINGLE_RANK, RankShape, routes
from workers.kv_transfer.stream_plan import (
    STAGING_SLOTS,
    PrefillSpan,
    WirePlan,
    block_runs,
    run_views,
    staged_bytes,
    touched_blocks,
    wire_plan,
)
from workers.kv_transfer.timeline import mark
from workers.kv_transfer.torch_pairs import TorchPair, TorchPairs
from workers.kv_transfer.transfer_table import TransferTable
from workers.protocol import encode

log = logging.getLogger(__name__)

ANNOUNCE_WAIT_S = 0.005
"""A request sent whole: the engine thread waits (at most this long) for its StreamPart and
StreamEnd to be on their sockets before it posts the sends; a stream's `finish`, for its
StreamEnd. Otherwise the control thread, which forwards them, can wait for the GIL behind
the engine thread's work (on CPU it did: the announce left after the last of 64 posts), and
the receiver, which posts its receives once the announce is in and is DONE only once the
StreamEnd is, is that much later. Bounded: a busy control thread delays, never blocks, the
engine (sends match the receives whenever these are posted)."""


@dataclass
class _Stream:
    """An open transfer, engine thread only: the receiver ranks it feeds (one, unless the
    decode worker has several ranks) and the reserved blocks, the same on each of them."""

    dests: list[str]
    dest_block_ids: list[int]
    parts: int = 0


@dataclass
class _PairStep:
    """One step's sends to one pair: its entries' runs, posted layer by layer."""

    pair: TorchPair
    entries: list[tuple[str, list[tuple[int, int, int]]]]
    wire: WirePlan = field(default_factory=lambda: WirePlan(False))

    @property
    def src_blocks(self) -> list[int]:
        """The step's source blocks in wire order (a staged message's rows)."""
        return [src + i for _, runs in self.entries for src, _, n in runs for i in range(n)]


class TorchSender(KVSender):
    """See the module doc and KVSender. `stream_hook()` is this object itself."""

    def __init__(self, layout: KVLayout, kv_caches: KVCaches, config: TransferConfig,
                 on_done: OnDone | None = None, on_failed: OnFailed | None = None,
                 sender_id: str | None = None, shape: RankShape = SINGLE_RANK,
                 rank: int = 0):
        self.layout = layout
        self.shape = shape
        """This worker's TP/PP shape; `rank` is this sender's place in it (routes)."""
        self.rank = rank
        self._routes: dict[str, list[str]] = {}
        self.kv_caches = kv_caches
        self.config = config
        self.sender_id = sender_id or uuid.uuid4().hex
        self.device = kv_caches[0][0].device
        self.table = TransferTable(on_done, on_failed)
        self._streams: dict[str, _Stream] = {}
        self._step: list[_PairStep] = []
        self._posted = PostedOps(self.table, self.device, op_timeout(config, self.device))
        self._copy = CopyStream(self.device)
        """Where staged messages are packed (CUDA): off the engine's stream, so a staging
        buffer waiting for its last send never holds up the next layer's compute."""
        self._pairs = TorchPairs(layout, config, self.sender_id, self.device, self.table,
                                 self._posted)

    # ---- engine thread ---------------------------------------------------------------------

    def routes(self, dest: str) -> list[str]:
        """The receiver ranks of (group) address `dest` this rank sends to; [] for none.
        Raises HandshakeMismatch where the two workers' shapes cannot work together."""
        if dest not in self._routes:
            self._routes[dest] = routes(self.layout, self.shape, dest).get(self.rank, [])
        return self._routes[dest]

    def open(self, request_id: str, dest: str, dest_block_ids: list[int],
             num_tokens: int | None = None, timeout_s: float | None = None) -> None:
        """Opens the transfer to every receiver rank of `dest` this rank feeds (none: no
        transfer here); DONE once each of them acked."""
        timeout_s = timeout_s or self.config.timeout_s
        try:
            dests = self.routes(dest)
        except HandshakeMismatch as err:
            self.table.add(request_id, timeout_s, peer=dest)
            self.table.finish(request_id, TransferState.FAILED, str(err), err)
            return
        if not dests:
            return
        self.table.add(request_id, timeout_s, peer=dests[0], peers=tuple(dests),
                       cells_needed=len(dests))
        self._streams[request_id] = _Stream(dests, list(dest_block_ids))
        for address in dests:
            self._pairs.connect(address)

    def stream_hook(self) -> TorchSender:
        return self

    def before_step(self, spans: list[PrefillSpan]) -> None:
        """Announces this step's blocks per pair (StreamPart); layer_done posts them."""
        self._announce(spans, whole=False)

    def _announce(self, spans: list[PrefillSpan], whole: bool,
                  held: dict[str, list[bytes]] | None = None) -> None:
        """StreamPart per pair for these spans; `whole`: every layer is posted right after
        (a prefilled request), so staged messages may span layers. `held`: the parts are
        added there per pair address instead of handed to the control thread."""
        by_pair: dict[str, _PairStep] = {}
        for span in spans:
            stream = self._streams.get(span.request_id)
            if stream is None or not self.table.in_flight(span.request_id):
                continue
            pairs = [self._pairs.ready(span.request_id, dest) for dest in stream.dests]
            if None in pairs:
                continue
            index = touched_blocks(span.start, span.end, self.layout.block_size)
            if index.stop > len(stream.dest_block_ids) or index.stop > len(span.block_table):
                self.table.finish(span.request_id, TransferState.FAILED,
                                  f"blocks {index} outside the reservation")
                continue
            runs = block_runs([span.block_table[i] for i in index],
                              [stream.dest_block_ids[i] for i in index])
            for pair in pairs:
                by_pair.setdefault(pair.dest, _PairStep(pair, [])).entries.append(
                    (span.request_id, runs))
            stream.parts += 1
        for step in by_pair.values():
            runs = sum(len(r) for _, r in step.entries)
            layer_bytes = staged_bytes(self.layout, step.pair.plan, len(step.src_blocks))
            step.wire = wire_plan(self.config, step.pair.direct, runs, layer_bytes, whole,
                                  one_launch(self.kv_caches))
            entries = [[rid, [[dest, n] for _, dest, n in runs]] for rid, runs in step.entries]
            self._command(step.pair.dest, encode(StreamPart(
                step.pair.generation, entries, step.wire.packed,
                step.wire.layers_per_message)), held)
        self._step = list(by_pair.values())

    def _command(self, dest: str, payload: bytes, held: dict[str, list[bytes]] | None):
        if held is None:
            self._pairs.command(dest, payload)
        else:
            held.setdefault(dest, []).append(payload)

    def layer_done(self, local_layer: int) -> None:
        """Posts layer `local_layer`'s sends of this step (after its compute, GPU-ordered)."""
        self._post_layers([local_layer])

    def _post_layers(self, local_layers: list[int]) -> None:
        """Posts these (consecutive) layers' sends per pair (several layers: a prefilled
        request sent whole, its views built while the first groups are on the wire)."""
        for step in self._step:
            plan = step.pair.plan
            layers = [self.layout.layer_start + local for local in local_layers]
            layers = [layer for layer in layers if plan.layer_start <= layer < plan.layer_end]
            if not layers:
                continue
            if step.wire.packed:
                self._post(step, len(layers), lambda group, step=step, layers=layers:
                           self._send_staged(group, step, range(layers[0], layers[-1] + 1)))
            else:
                self._post(step, len(layers), lambda group, step=step, layers=layers:
                           self._send_runs(group, step, layers))

    def _send_runs(self, group: PairGroup, step: _PairStep, layers: list[int]):
        """The runs' K and V views of these layers, straight from the cache, ordered after
        the engine's stream; (works, no staging)."""

        def views():
            runs = [(src, n) for _, runs in step.entries for src, _, n in runs]
            for layer in layers:
                k_cache, v_cache = self.kv_caches[layer - self.layout.layer_start]
                yield from run_views(k_cache, v_cache, runs)

        return group.post_many(views(), send=True), []

    def _send_staged(self, group: PairGroup, step: _PairStep, layers: range):
        """Staged messages of `step.wire` covering `layers`, each packed then sent on the
        side stream (after the engine's stream has written the KV). CUDA: the messages
        cycle through STAGING_SLOTS buffers, a buffer packed again once its last send has
        ended (stream-ordered, no host wait); (works, staging buffers)."""
        plan, ids = step.pair.plan, step.src_blocks
        messages = step.wire.messages(layers)
        layer_elems = staged_bytes(self.layout, plan, len(ids)) // self.layout.element_size
        ring = STAGING_SLOTS if self.device.type == "cuda" else len(messages)
        dtype = self.kv_caches[0][0].dtype
        slots = [torch.empty(layer_elems * len(messages[0]), dtype=dtype, device=self.device)
                 for _ in range(min(ring, len(messages)))]
        sent: list[list] = []
        event = record_event(self.device)
        with self._copy:
            self._copy.wait_event(event)
            for m, message in enumerate(messages):
                if m >= ring:
                    for work in sent[m - ring]:
                        work.wait()  # CUDA: the side stream waits for that send's end
                one = TransferPlan(message.start, message.stop, plan.kv_head_start,
                                   plan.kv_head_end)
                buf = pack(self.kv_caches, self.layout, one, ids,
                           out=slots[m % ring][:layer_elems * len(message)])
                sent.append(group.post_many([as_bytes(buf)], send=True))
        return [work for works in sent for work in works], slots

    def _post(self, step: _PairStep, num_layers: int, send) -> None:
        """Posts one batch of sends (`send(group)` -> (works, staging)) of `num_layers`
        layers for the step's requests, pinned until the works end. Their bytes are counted
        first: a request sent whole has its StreamEnd out already, so its ack may come back
        (DONE) as soon as the last send ends."""
        rids = [rid for rid, _ in step.entries if self.table.pin(rid)]
        per_block = staged_bytes(self.layout, step.pair.plan, 1) * num_layers
        for rid, runs in step.entries:
            record = self.table.get(rid)
            if record is not None:
                moved = per_block * sum(n for _, _, n in runs)
                record.num_bytes += moved
                dest = step.pair.dest
                record.peer_bytes[dest] = record.peer_bytes.get(dest, 0) + moved
        try:
            works, staging = send(step.pair.group)
        except Exception as err:  # noqa: BLE001 - a broken communicator fails its transfers
            for rid in rids:
                self.table.unpin(rid)
                self.table.end(rid, TransferState.FAILED, f"{type(err).__name__}: {err}")
            return
        self._posted.add(Posted(step.pair.dest, works, rids, staging=staging))

    def finish(self, request_id: str, src_block_ids: list[int] | None = None,
               extra: dict | None = None, num_tokens: int | None = None) -> None:
        """Token 1 is out: StreamEnd (with `extra`) after the request's last part; returns
        once it is on its sockets (at most ANNOUNCE_WAIT_S): the receiver is DONE only with
        it, and the engine's next step would otherwise hold the GIL the control thread
        needs to forward it."""
        held: dict[str, list[bytes]] = {}
        self._end(request_id, extra, held)
        self._put_on_wire(held)

    def _put_on_wire(self, held: dict[str, list[bytes]]) -> None:
        """Hands each pair's held messages to the control thread (one wake-up per pair)
        and waits, at most ANNOUNCE_WAIT_S in all, until they are on their sockets."""
        on_wire = [threading.Event() for _ in held]
        for (address, payloads), event in zip(held.items(), on_wire, strict=True):
            self._pairs.command(address, *payloads, on_wire=event)
        mark("s.queued")
        deadline = time.monotonic() + ANNOUNCE_WAIT_S
        for event in on_wire:
            event.wait(max(0.0, deadline - time.monotonic()))
        mark("s.on_wire")

    def _end(self, request_id: str, extra: dict | None,
             held: dict[str, list[bytes]] | None = None) -> None:
        """StreamEnd on each of the request's pairs (`held`: see `_announce`)."""
        stream = self._streams.pop(request_id, None)
        record = self.table.get(request_id)
        if stream is None or record is None or record.state.terminal:
            return
        pairs = [self._pairs.get(dest) for dest in stream.dests]
        if any(pair is None or pair.plan is None for pair in pairs):
            self.table.finish(request_id, TransferState.FAILED, "pair gone before StreamEnd")
            return
        record.extra = dict(extra or {})
        for pair in pairs:
            self._command(pair.dest, encode(StreamEnd(
                request_id, pair.generation, stream.parts, pair.plan.num_cells, record.extra)),
                held)

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def send(self, request_id: str, dest: str, src_block_ids: list[int],
             dest_block_ids: list[int], extra: dict | None = None,
             num_tokens: int | None = None, timeout_s: float | None = None) -> None:
        """A prefilled request, whole: one step of all its blocks, every layer posted now.

        Its StreamPart and StreamEnd go to the control thread together, before the sends are
        posted (the receiver posts its receives as soon as the part is in, and is DONE once
        they landed, with no further message from here), and the posts wait (at most
        ANNOUNCE_WAIT_S) until both are on their sockets."""
        num_blocks = blocks_to_send(self.layout.block_size, num_tokens, src_block_ids,
                                    dest_block_ids)
        tokens = num_tokens or num_blocks * self.layout.block_size
        mark("s.send")
        self.open(request_id, dest, dest_block_ids, tokens, timeout_s)
        held: dict[str, list[bytes]] = {}
        self._announce([PrefillSpan(request_id, 0, tokens, list(src_block_ids))], whole=True,
                       held=held)
        self._end(request_id, extra, held)
        self._put_on_wire(held)
        self._post_layers(list(range(len(self.kv_caches))))
        mark("s.posted")
        self._step = []

    def fence(self) -> None:
        """Orders the engine's next kernels after every posted send (its blocks may be
        reused: a preemption freed them)."""
        self._posted.fence()

    # ---- pairs -----------------------------------------------------------------------------

    def connect(self, dest: str) -> None:
        """Sets up the pairs with the receiver ranks of `dest` this rank feeds."""
        try:
            dests = self.routes(dest)
        except HandshakeMismatch as err:
            log.warning("kv sender %s: no route to %s: %s", self.sender_id, dest, err)
            return
        for address in dests:
            self._pairs.connect(address)

    def pairs(self) -> list[str]:
        return self._pairs.pairs()

    def path(self, peer: str) -> str | None:
        return self._pairs.path(peer)

    def bandwidth(self, peer: str) -> float | None:
        return self._pairs.bandwidth(peer)

    def sends(self, peer: str) -> tuple[int, int]:
        """(messages, bytes) this sender has put on the wire to `peer` (warm-up and probe
        included): the difference around a transfer is what it sent."""
        return self._pairs.sends(peer)

    def wait_ready(self, dest: str, timeout_s: float) -> bool:
        """Blocks until the pair with `dest` is set up (True) or failed / timed out."""
        return self._pairs.wait_ready(dest, timeout_s)

    def close(self) -> None:
        self._pairs.close()
        self._posted.close()
