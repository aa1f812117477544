"""Decode side of the torch transport: receives pre-posted into the reserved blocks.

Used by `Receiver` (workers/kv_transfer/receiver.py), whose control thread calls `part`,
`end` and `poll`; the pair's own thread builds the communicator (`build`). For each StreamPart
the receives of every layer of the step are posted at once, in the sender's order, straight
into the reserved blocks (a discard buffer for a request that is no longer reserved, so the
sender's sends still match). A request is DONE once its senders' StreamEnds arrived and every
part they announced has landed; each sender then gets its ack.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from workers.kv_transfer.base import TransferState
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.layout import KVLayout, TransferPlan, plan_transfer
from workers.kv_transfer.messages import Hello, Reply, StreamEnd, StreamPart
from workers.kv_transfer.packing import CopyStream, KVCaches, unpack
from workers.kv_transfer.pair_group import RECEIVER_RANK, PairGroup, op_timeout
from workers.kv_transfer.pair_state import ReceiverPair
from workers.kv_transfer.posted import Posted, PostedOps
from workers.kv_transfer.stream_plan import STAGING_SLOTS, WirePlan, run_views, staged_bytes
from workers.kv_transfer.timeline import mark
from workers.kv_transfer.transfer_table import TransferTable

log = logging.getLogger(__name__)

Reply_ = Callable[[bytes, object], None]


class TorchReceiving:
    """The torch transport's receiving half for every pair of one Receiver."""

    def __init__(self, layout: KVLayout, kv_caches: KVCaches, config: TransferConfig,
                 table: TransferTable, reply: Reply_):
        self.layout = layout
        self.kv_caches = kv_caches
        self.config = config
        self.table = table
        self._reply = reply
        self.device = kv_caches[0][0].device
        self._posted = PostedOps(table, self.device, op_timeout(config, self.device))
        self._stream: CopyStream | None = None

    def build(self, peer: ReceiverPair, store, hello: Hello) -> None:
        """Pair thread: the communicator (warm-up included), then the probe's receives."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            group = PairGroup(store, self.config.host, store.port, RECEIVER_RANK,
                              peer.generation, self.device, self.config.connect_timeout_s,
                              op_timeout(self.config, self.device))
            peer.group = group
            peer.path = group.backend
            if hello.probe_bytes > 0:
                buf = torch.empty(hello.probe_bytes, dtype=torch.uint8, device=self.device)
                works = [group.post_recv(buf) for _ in range(hello.probe_rounds + 1)]
                for work in works:
                    group.wait(work, self.config.connect_timeout_s)
        except RuntimeError as err:
            log.warning("kv pair with %s: communicator failed: %s", peer.sender_id, err)

    def pending(self) -> bool:
        return self._posted.pending()

    def part(self, peer: ReceiverPair, msg: StreamPart) -> None:
        """Pre-posts every layer's receives of one StreamPart, in the sender's order."""
        mark("r.part")
        if peer.group is None or msg.generation != peer.generation:
            for rid, _ in msg.entries:
                self._reply(peer.identity, Reply(rid, "ack", False,
                                                 "stale pair: shake hands again"))
            return
        plan = plan_transfer(peer.layout, self.layout)
        entries = [(rid, [tuple(run) for run in runs], self._accepts(rid, runs))
                   for rid, runs in msg.entries]
        for rid, _, ok in entries:
            if ok:
                self.table.start(rid)
        accepted = [rid for rid, _, ok in entries if ok and self.table.pin(rid)]
        if self._stream is None:
            self._stream = CopyStream(self.device)
        works, thens, num_bytes, staging, error = [], [], 0, [], None
        with self._stream:
            try:
                if msg.packed:
                    works, thens, num_bytes, staging = self._post_staged(
                        peer, plan, entries, accepted, msg.layers_per_message)
                else:
                    works, num_bytes = self._post_runs(peer, plan, entries, accepted)
            except Exception as err:  # noqa: BLE001 - a broken communicator fails them
                error = f"{type(err).__name__}: {err}"
        # One wait for the whole part: only its end matters (the request's KV is ready), and
        # one wake-up per layer would add up to milliseconds.
        mark("r.posted")
        landed = self._landed(accepted, num_bytes, len(entries), thens, peer, error)
        self._posted.add(Posted(peer.sender_id, works, accepted, landed, time.monotonic(),
                                staging=staging))

    def _accepts(self, rid: str, runs: list) -> bool:
        record = self.table.get(rid)
        if record is None or record.state.terminal:
            return False
        reserved = set(record.block_ids)
        return all(reserved.issuperset(range(first, first + n)) for first, n in runs)

    def _post_runs(self, peer: ReceiverPair, plan: TransferPlan, entries: list,
                   accepted: list[str]) -> tuple[list, int]:
        """Every layer's receives straight into the blocks, in the sender's order; the views
        are built while the first groups are already on the wire (see PairGroup.post_many).
        """
        num_bytes = 0

        def views():
            nonlocal num_bytes
            for layer in range(plan.layer_start, plan.layer_end):
                k_cache, v_cache = self.kv_caches[layer - self.layout.layer_start]
                for rid, runs, _ in entries:
                    for view in run_views(k_cache, v_cache, runs):
                        num_bytes += view.numel() * view.element_size()
                        yield view if rid in accepted else torch.empty_like(view)

        works = peer.group.post_many(views(), send=False)
        return works, num_bytes

    def _post_staged(self, peer: ReceiverPair, plan: TransferPlan, entries: list,
                     accepted: list[str], layers_per_message: int):
        """The staged messages' receives (`layers_per_message` layers each, in the sender's
        order), each scattered into the blocks once it landed; (works, gloo unpacks to run
        after them, bytes, staging buffers).

        CUDA: the scatters queue on this pair's copy stream right behind their receives, and
        the messages cycle through STAGING_SLOTS buffers: a receive posted once the scatter
        of the buffer's last message is queued waits for it (the receive orders after the
        copy stream), so staging stays bounded with no host round trip on the KV-ready path;
        the scatter of message m is queued only after receive m + STAGING_SLOTS - 1 is
        posted, so no receive waits for its predecessor's scatter."""
        blocks = [(rid, first + i) for rid, runs, _ in entries for first, n in runs
                  for i in range(n)]
        layer_bytes = staged_bytes(self.layout, plan, len(blocks))
        messages = WirePlan(True, layers_per_message).messages(
            range(plan.layer_start, plan.layer_end))
        cuda = self.device.type == "cuda"
        ring = STAGING_SLOTS if cuda else len(messages)
        slots = [torch.empty(layer_bytes * len(messages[0]), dtype=torch.uint8,
                             device=self.device) for _ in range(min(ring, len(messages)))]
        keep = set(accepted)
        posted, works, thens = [], [], []

        def scatter(m: int) -> None:
            message_works, buf, one = posted[m]
            for work in message_works:
                work.wait()  # orders the copy stream after the receive
            unpack_rows(buf, self.kv_caches, self.layout, one, blocks, keep)

        for m, message in enumerate(messages):
            if cuda and m >= ring:
                scatter(m - ring)
            buf = slots[m % ring][:layer_bytes * len(message)]
            message_works = peer.group.post_many([buf], send=False)
            one = TransferPlan(message.start, message.stop, plan.kv_head_start,
                               plan.kv_head_end)
            posted.append((message_works, buf, one))
            works += message_works
            if not cuda:
                thens.append(self._unpacker(buf, one, blocks, keep))
        if cuda:
            for m in range(max(0, len(messages) - ring), len(messages)):
                scatter(m)
            works.append(EventWork(self.device))
        return works, thens, layer_bytes * plan.num_layers, slots

    def _unpacker(self, staging: torch.Tensor, one: TransferPlan, blocks: list, accepted: set):
        """gloo: after a staged message landed, scatter it into the blocks of live requests."""

        def unpack_live(ok: bool) -> None:
            live = set()
            for rid in accepted:
                record = self.table.get(rid)
                if ok and record is not None and not record.state.terminal:
                    live.add(rid)
            unpack_rows(staging, self.kv_caches, self.layout, one, blocks, live)

        return unpack_live

    def _landed(self, accepted: list[str], num_bytes: int, num_entries: int, thens: list,
                peer: ReceiverPair, error: str | None):
        """What runs when a part's receives end: (gloo) the unpacks, bytes counted, and each
        accepted request's part landed (maybe completing it); a failure fails them all."""
        per_request = num_bytes // max(1, num_entries)

        def landed(ok: bool) -> None:
            mark("r.landed")
            ok = ok and error is None
            for then in thens:
                then(ok)
            for rid in accepted:
                record = self.table.get(rid)
                if record is None:
                    continue
                if not ok:
                    self.table.end(rid, TransferState.FAILED,
                                   error or "receive failed (pair broken)")
                    continue
                record.num_bytes += per_request
                if self.table.land_part(rid, peer.identity, time.perf_counter()):
                    self._settle(rid)

        return landed

    def end(self, peer: ReceiverPair, msg: StreamEnd) -> None:
        mark("r.end")
        if msg.generation != peer.generation or not self.table.stream_ended(
                msg.request_id, peer.identity, msg.parts, msg.cells, msg.extra):
            record = self.table.get(msg.request_id)
            state = record.state.value if record else "unknown"
            self._reply(peer.identity, Reply(msg.request_id, "ack", False,
                                             f"no reservation for {msg.request_id!r} "
                                             f"(state {state})"))
            return
        self._settle(msg.request_id)

    def _settle(self, rid: str) -> None:
        mark("r.settle")
        for identity in self.table.settle(rid):
            self._reply(identity, Reply(rid, "ack"))

    def poll(self, peers: dict[bytes, ReceiverPair], drop: Callable[[ReceiverPair], None]):
        """Ends finished receives; a pair whose receives failed or are stuck past every
        deadline they serve is dropped (its communicator aborted, which ends the rest)."""
        for sender_id in self._posted.stuck_peers(self._stuck):
            for peer in [p for p in peers.values() if p.sender_id == sender_id]:
                drop(peer)

    def _stuck(self, posted: Posted) -> bool:
        now = time.monotonic()
        records = [self.table.get(rid) for rid in posted.request_ids]
        late = [r is None or (r.state.terminal and r.deadline < now) for r in records]
        return all(late) and (bool(records) or self._discard_late(posted, now))

    def _discard_late(self, posted: Posted, now: float) -> bool:
        return now - posted.posted_at > self.config.timeout_s

    def close(self) -> None:
        self._posted.close()

    def cancel(self, peer: ReceiverPair) -> None:
        """Before the pair's communicator is aborted: its posted receives count as failed."""
        self._posted.cancel(peer.sender_id)


def unpack_rows(staging: torch.Tensor, kv_caches: KVCaches, layout: KVLayout,
                one: TransferPlan, blocks: list[tuple[str, int]], keep: set[str]) -> None:
    """Scatters one staged message (the layers of `one`) into the blocks of the requests in
    `keep` (the others' rows are dropped: their reservations are gone)."""
    rows = [i for i, (owner, _) in enumerate(blocks) if owner in keep]
    if not rows:
        return
    view = staging.view(2 * one.num_layers, len(blocks), -1)
    if len(rows) < len(blocks):
        view = view[:, rows]
    unpack(view.contiguous(), kv_caches, layout, one, [blocks[i][1] for i in rows])


class EventWork:
    """A CUDA event recorded now on the current stream, polled like a torch.distributed work."""

    def __init__(self, device: torch.device):
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(device))

    def is_completed(self) -> bool:
        return self._event.query()

    def wait(self, timeout=None) -> None:
        self._event.wait()
