"""Prefill side of the torch transport (NCCL between GPUs, gloo on CPU): KV streamed layer
by layer while the prefill runs.

Per destination one pair: a ZMQ DEALER for control and a two-rank communicator built eagerly
when the pair is set up (`connect`, at worker start or join): handshake, warm-up exchange,
bandwidth probe. Then, per prefill step, the engine thread
- `before_step`: announces the step's blocks to each receiver (StreamPart), which pre-posts
  its receives straight into the reserved blocks;
- `layer_done(i)`: posts layer i's sends as one grouped call, ordered after layer i's
  compute on the engine's stream, so the wire time hides under the remaining layers;
- `finish`: after token 1, sends StreamEnd (token 1 rides in it); the receiver acks DONE.
A control thread owns the sockets, handshakes and acks, watches the posted sends (blocks stay
pinned until they end) and the deadlines; a stuck pair is torn down, which ends its sends.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import zmq

from workers.errors import HandshakeMismatch
from workers.kv_transfer.base import KVSender, OnDone, OnFailed, TransferState, blocks_to_send
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.layout import KVLayout, TransferPlan, check_compatible, plan_transfer
from workers.kv_transfer.messages import Hello, HelloReply, PairReport, Reply, StreamEnd, StreamPart
from workers.kv_transfer.outbox import Outbox
from workers.kv_transfer.packing import KVCaches, pack
from workers.kv_transfer.pair_group import SENDER_RANK, PairGroup, op_timeout
from workers.kv_transfer.posted import Posted, PostedOps
from workers.kv_transfer.stream_plan import (
    PrefillSpan,
    block_runs,
    is_direct,
    run_views,
    touched_blocks,
    use_packed,
)
from workers.kv_transfer.transfer_table import TransferTable
from workers.protocol import decode, encode

log = logging.getLogger(__name__)


class _Pair:
    """One destination. The control thread owns `sock`; the engine thread posts on `group`
    once `ready` is set (and reads the fields set before it)."""

    def __init__(self, dest: str, deadline: float):
        self.dest = dest
        self.deadline = deadline
        """Set up by then, or torn down."""
        self.sock: zmq.Socket | None = None
        self.group: PairGroup | None = None
        self.generation = 0
        self.plan: TransferPlan | None = None
        self.direct = True
        self.path: str | None = None
        self.gbps: float | None = None
        self.error: Exception | None = None
        self.ready = threading.Event()
        self.last_used = time.monotonic()


@dataclass
class _Stream:
    """An open transfer, engine thread only."""

    dest: str
    dest_block_ids: list[int]
    parts: int = 0


@dataclass
class _PairStep:
    """One step's sends to one pair: its entries' runs, posted layer by layer."""

    pair: _Pair
    entries: list[tuple[str, list[tuple[int, int, int]]]]
    packed: bool = False


class TorchSender(KVSender):
    """See the module doc and KVSender. `stream_hook()` is this object itself."""

    def __init__(self, layout: KVLayout, kv_caches: KVCaches, config: TransferConfig,
                 on_done: OnDone | None = None, on_failed: OnFailed | None = None,
                 sender_id: str | None = None):
        self.layout = layout
        self.kv_caches = kv_caches
        self.config = config
        self.sender_id = sender_id or uuid.uuid4().hex
        self.device = kv_caches[0][0].device
        self.table = TransferTable(on_done, on_failed)
        self._pairs: dict[str, _Pair] = {}
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._step: list[_PairStep] = []
        self._posted = PostedOps(self.table, self.device)
        self._ctx = zmq.Context.instance()
        self._outbox = Outbox(self._ctx, "kv-send-outbox")
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kv-send", daemon=True)
        self._thread.start()

    # ---- engine thread ---------------------------------------------------------------------

    def connect(self, dest: str) -> None:
        with self._lock:
            if dest in self._pairs:
                return
            victim = self._least_recently_used() if len(self._pairs) >= \
                self.config.max_pairs else None
            self._pairs[dest] = _Pair(dest, time.monotonic() + self.config.connect_timeout_s)
        if victim is not None:
            self._command(victim, b"evict")
        self._command(dest, b"connect")

    def _least_recently_used(self) -> str | None:
        """The idle pair to evict for a new one (None: every pair is busy; the bound gives)."""
        busy = {r.peer for r in self.table.live()}
        idle = [p for p in self._pairs.values() if p.dest not in busy and p.ready.is_set()
                and not self._posted.pending(p.dest)]
        return min(idle, key=lambda p: p.last_used).dest if idle else None

    def open(self, request_id: str, dest: str, dest_block_ids: list[int],
             num_tokens: int | None = None, timeout_s: float | None = None) -> None:
        self.table.add(request_id, timeout_s or self.config.timeout_s, peer=dest)
        self._streams[request_id] = _Stream(dest, list(dest_block_ids))
        self.connect(dest)

    def stream_hook(self) -> TorchSender:
        return self

    def before_step(self, spans: list[PrefillSpan]) -> None:
        """Announces this step's blocks per pair (StreamPart); layer_done posts them."""
        by_pair: dict[str, _PairStep] = {}
        for span in spans:
            stream = self._streams.get(span.request_id)
            if stream is None or not self.table.in_flight(span.request_id):
                continue
            pair = self._ready_pair(span.request_id, stream.dest)
            if pair is None:
                continue
            index = touched_blocks(span.start, span.end, self.layout.block_size)
            if index.stop > len(stream.dest_block_ids) or index.stop > len(span.block_table):
                self.table.finish(span.request_id, TransferState.FAILED,
                                  f"blocks {index} outside the reservation")
                continue
            runs = block_runs([span.block_table[i] for i in index],
                              [stream.dest_block_ids[i] for i in index])
            step = by_pair.setdefault(stream.dest, _PairStep(pair, []))
            step.entries.append((span.request_id, runs))
            stream.parts += 1
        for step in by_pair.values():
            step.packed = use_packed(step.pair.direct, sum(len(r) for _, r in step.entries))
            entries = [[rid, [[dest, n] for _, dest, n in runs]] for rid, runs in step.entries]
            self._command(step.pair.dest, encode(StreamPart(step.pair.generation, entries,
                                                            step.packed)))
        self._step = list(by_pair.values())

    def layer_done(self, local_layer: int) -> None:
        """Posts layer `local_layer`'s sends of this step (after its compute, GPU-ordered)."""
        self._post_layers([local_layer])

    def _post_layers(self, local_layers: list[int]) -> None:
        """Posts these layers' sends per pair (several layers: a prefilled request sent
        whole, its views built while the first groups are on the wire)."""
        for step in self._step:
            plan = step.pair.plan
            layers = [(local, self.layout.layer_start + local) for local in local_layers]
            layers = [(local, layer) for local, layer in layers
                      if plan.layer_start <= layer < plan.layer_end]
            if layers:
                self._post(step, (buf for local, layer in layers
                                  for buf in self._layer_bufs(step, local, layer)))

    def _layer_bufs(self, step: _PairStep, local: int, layer: int) -> list[torch.Tensor]:
        if not step.packed:
            k_cache, v_cache = self.kv_caches[local]
            return run_views(k_cache, v_cache,
                             [(src, n) for _, runs in step.entries for src, _, n in runs])
        plan = step.pair.plan
        one = TransferPlan(layer, layer + 1, plan.kv_head_start, plan.kv_head_end)
        ids = [src + i for _, runs in step.entries for src, _, n in runs for i in range(n)]
        return [pack(self.kv_caches, self.layout, one, ids).reshape(-1)]

    def _post(self, step: _PairStep, bufs: Iterable[torch.Tensor]) -> None:
        rids = [rid for rid, _ in step.entries if self.table.pin(rid)]
        num_bytes = 0

        def counted():
            nonlocal num_bytes
            for buf in bufs:
                num_bytes += buf.numel() * buf.element_size()
                yield buf

        try:
            works = step.pair.group.post_many(counted(), send=True)
        except Exception as err:  # noqa: BLE001 - a broken communicator fails its transfers
            for rid in rids:
                self.table.unpin(rid)
                self.table.end(rid, TransferState.FAILED, f"{type(err).__name__}: {err}")
            return
        per_block = num_bytes // max(1, sum(n for _, runs in step.entries for _, _, n in runs))
        for rid, runs in step.entries:
            record = self.table.get(rid)
            if record is not None:
                record.num_bytes += per_block * sum(n for _, _, n in runs)
        self._posted.add(Posted(step.pair.dest, works, rids))

    def finish(self, request_id: str, src_block_ids: list[int] | None = None,
               extra: dict | None = None, num_tokens: int | None = None) -> None:
        """Token 1 is out: StreamEnd (with `extra`) after the request's last part."""
        stream = self._streams.pop(request_id, None)
        record = self.table.get(request_id)
        if stream is None or record is None or record.state.terminal:
            return
        pair = self._pairs.get(stream.dest)
        if pair is None or pair.plan is None:
            self.table.finish(request_id, TransferState.FAILED, "pair gone before StreamEnd")
            return
        record.extra = dict(extra or {})
        self._command(stream.dest, encode(StreamEnd(
            request_id, pair.generation, stream.parts, pair.plan.num_cells, record.extra)))

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def send(self, request_id: str, dest: str, src_block_ids: list[int],
             dest_block_ids: list[int], extra: dict | None = None,
             num_tokens: int | None = None, timeout_s: float | None = None) -> None:
        """A prefilled request, whole: one step of all its blocks, every layer posted now."""
        num_blocks = blocks_to_send(self.layout.block_size, num_tokens, src_block_ids,
                                    dest_block_ids)
        tokens = num_tokens or num_blocks * self.layout.block_size
        self.open(request_id, dest, dest_block_ids, tokens, timeout_s)
        self.before_step([PrefillSpan(request_id, 0, tokens, list(src_block_ids))])
        self._post_layers(list(range(len(self.kv_caches))))
        self._step = []
        self.finish(request_id, extra=extra)

    def fence(self) -> None:
        """Orders the engine's next kernels after every posted send (its blocks may be
        reused: a preemption freed them)."""
        self._posted.fence()

    def _ready_pair(self, request_id: str, dest: str) -> _Pair | None:
        with self._lock:
            pair = self._pairs.get(dest)
        record = self.table.get(request_id)
        if pair is None or record is None:
            return None
        if not pair.ready.wait(max(0.0, record.deadline - time.monotonic())):
            self.table.finish(request_id, TransferState.FAILED, f"pair with {dest} not ready")
            return None
        if pair.error is not None:
            error = pair.error if isinstance(pair.error, HandshakeMismatch) else None
            self.table.finish(request_id, TransferState.FAILED, str(pair.error), error)
            return None
        pair.last_used = time.monotonic()
        return pair

    def _command(self, dest: str, payload: bytes) -> None:
        self._outbox.put([dest.encode(), payload])

    # ---- control thread --------------------------------------------------------------------

    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        poller = zmq.Poller()
        poller.register(self._outbox.socket, zmq.POLLIN)
        while not self._closed.is_set():
            ready = dict(poller.poll(int(self.config.tick_s * 1000)))
            while self._outbox.socket.poll(0):
                dest, payload = self._outbox.socket.recv_multipart()
                self._outgoing(poller, dest.decode(), payload)
            for pair in list(self._pairs.values()):
                if pair.sock is not None and pair.sock in ready:
                    while pair.sock is not None and pair.sock.poll(0):
                        self._incoming(poller, pair, decode(pair.sock.recv()))
            self.table.expire()  # first: a stuck send's transfer fails by its deadline's name
            for dest in self._posted.stuck_peers(self._stuck):
                self._teardown(poller, dest, "a send is stuck past its deadline")
            self._evict_idle(poller)

    def _outgoing(self, poller: zmq.Poller, dest: str, payload: bytes) -> None:
        if payload == b"connect":
            self._start_pair(poller, dest)
        elif payload == b"evict":
            self._teardown(poller, dest, f"evicted: more than {self.config.max_pairs} pairs")
        elif payload.startswith(b"ready:"):
            pair = self._pairs.get(dest)
            if pair is not None and pair.sock is not None:
                pair.sock.send(encode(PairReport(pair.path or "", pair.gbps or 0.0)))
                pair.ready.set()
                log.info("kv pair %s -> %s: path %s, %.2f GB/s", self.sender_id[:8], dest,
                         pair.path, pair.gbps or 0.0)
        elif payload.startswith(b"broken:"):
            pair = self._pairs.get(dest)
            if pair is not None and pair.sock is not None:
                self._teardown(poller, dest, payload[7:].decode())
        else:
            pair = self._pairs.get(dest)
            if pair is not None and pair.sock is not None:
                pair.sock.send(payload)

    def _start_pair(self, poller: zmq.Poller, dest: str) -> None:
        pair = self._pairs.get(dest)
        if pair is None or pair.sock is not None:
            return
        pair.sock = self._ctx.socket(zmq.DEALER)
        pair.sock.setsockopt(zmq.LINGER, 0)
        pair.sock.connect(dest)
        poller.register(pair.sock, zmq.POLLIN)
        pair.sock.send(encode(Hello(self.sender_id, self.layout.to_dict(), "torch",
                                    probe_bytes=self.config.probe_bytes,
                                    probe_rounds=self.config.probe_rounds)))

    def _incoming(self, poller: zmq.Poller, pair: _Pair, msg) -> None:
        if isinstance(msg, HelloReply):
            self._hello_reply(poller, pair, msg)
        elif isinstance(msg, Reply) and msg.ok:
            self.table.finish(msg.request_id, TransferState.DONE)
        elif isinstance(msg, Reply):
            self.table.end(msg.request_id, TransferState.FAILED, msg.reason)
            if msg.reason.startswith("stale pair"):
                self._teardown(poller, pair.dest, msg.reason)

    def _hello_reply(self, poller: zmq.Poller, pair: _Pair, reply: HelloReply) -> None:
        try:
            if reply.mismatch:
                field_name, theirs, mine = reply.mismatch
                raise HandshakeMismatch(field_name, mine, theirs)
            remote = KVLayout.from_dict(reply.layout)
            check_compatible(self.layout, remote)
            pair.plan = plan_transfer(self.layout, remote)
            if pair.plan is None:
                raise HandshakeMismatch("slice", "no shared layer/head", str(remote))
        except HandshakeMismatch as err:
            pair.error = err
            pair.ready.set()
            log.warning("kv pair %s -> %s refused: %s", self.sender_id[:8], pair.dest, err)
            return
        pair.direct = is_direct(pair.plan, self.layout, remote)
        pair.generation = reply.generation
        host = pair.dest.split("://", 1)[1].rsplit(":", 1)[0]
        threading.Thread(target=self._build, args=(pair, host, reply.store_port),
                         name=f"kv-pair-{pair.dest}", daemon=True).start()

    def _build(self, pair: _Pair, host: str, store_port: int) -> None:
        """Pair thread: communicator (with warm-up), then the probe; reports to the loop."""
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            pair.group = PairGroup(None, host, store_port, SENDER_RANK, pair.generation,
                                   self.device, self.config.connect_timeout_s,
                                   op_timeout(self.config, self.device))
            pair.path = pair.group.backend
            pair.gbps = probe_sends(pair.group, self.config, self.device)
            self._command(pair.dest, b"ready:")
        except Exception as err:  # noqa: BLE001 - any set-up error: this pair only
            log.warning("kv pair %s -> %s: set-up failed: %r", self.sender_id[:8], pair.dest,
                        err)
            pair.error = err
            pair.ready.set()
            self._command(pair.dest, b"broken:" + repr(err).encode())

    def _stuck(self, posted: Posted) -> bool:
        """A posted send whose transfers are all past their deadline (or gone)."""
        now = time.monotonic()
        records = [self.table.get(rid) for rid in posted.request_ids]
        return all(r is None or (r.state.terminal and r.deadline < now) for r in records)

    def _teardown(self, poller: zmq.Poller, dest: str, why: str) -> None:
        """Drops a pair: aborts its communicator (its posted sends end), fails its transfers.
        The next `connect` or `open` builds it afresh."""
        with self._lock:
            pair = self._pairs.pop(dest, None)
        if pair is None:
            return
        log.warning("kv pair %s -> %s torn down: %s", self.sender_id[:8], dest, why)
        self._posted.cancel(dest)  # before the abort: what it ends counts as failed
        if pair.group is not None:
            pair.group.close()
        for record in self.table.live():
            if record.peer == dest:
                self.table.end(record.request_id, TransferState.FAILED, f"pair lost: {why}")
        if pair.sock is not None:
            poller.unregister(pair.sock)
            pair.sock.close(linger=0)
            pair.sock = None
        pair.error = pair.error or RuntimeError(why)
        pair.ready.set()

    def _evict_idle(self, poller: zmq.Poller) -> None:
        now = time.monotonic()
        busy = {r.peer for r in self.table.live()}
        for pair in list(self._pairs.values()):
            if not pair.ready.is_set() and now > pair.deadline:
                self._teardown(poller, pair.dest, "no handshake reply")
            elif pair.dest not in busy and now - pair.last_used > self.config.idle_evict_s \
                    and not self._posted.pending(pair.dest):
                self._teardown(poller, pair.dest, "idle")

    # ---- queries and shutdown -------------------------------------------------------------

    def pairs(self) -> list[str]:
        with self._lock:
            return list(self._pairs)

    def path(self, peer: str) -> str | None:
        pair = self._pairs.get(peer)
        return pair.path if pair and pair.ready.is_set() else None

    def bandwidth(self, peer: str) -> float | None:
        pair = self._pairs.get(peer)
        return pair.gbps if pair and pair.ready.is_set() else None

    def wait_ready(self, dest: str, timeout_s: float) -> bool:
        """Blocks until the pair with `dest` is set up (True) or failed / timed out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pair = self._pairs.get(dest)
            if pair is not None and pair.ready.wait(0.01):
                return pair.error is None
            time.sleep(0.01)
        return False

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout=5)
        self.table.fail_all("sender closed")
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            self._posted.cancel(pair.dest)
            if pair.group is not None:
                pair.group.close()
                pair.group = None
            if pair.sock is not None:
                pair.sock.close(linger=0)
            pair.ready.set()
        self._posted.close()
        self._outbox.close()


def probe_sends(group: PairGroup, config: TransferConfig, device: torch.device) -> float | None:
    """Sender's half of the start-up probe: `probe_rounds + 1` sends the receiver pre-posted;
    the best round's GB/s (the first warms up)."""
    if config.probe_bytes <= 0:
        return None
    from workers.kv_transfer.probe import measure_gbps

    buf = torch.zeros(config.probe_bytes, dtype=torch.uint8, device=device)
    return measure_gbps(lambda _: group.send(buf, config.connect_timeout_s),
                        config.probe_bytes, config.probe_rounds)
