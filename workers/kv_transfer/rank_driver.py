"""The driver rank's end of KV transfer for a prefill or decode worker of several ranks.

Every rank moves its own slice rank to rank (no gather onto one rank): the driver's own slice
through a local TorchSender / Receiver, the other ranks' through theirs
(workers/kv_transfer/rank_follower.py), told what to do by commands in the step broadcast.
The driver keeps the worker-level transfer in its own TransferTable: a request's transfer is
DONE once every rank that takes part reported its own DONE; FAILED as soon as any rank's
fails (then every rank's is aborted, and the worker's failover applies); and quiet (its
blocks may be freed) once every rank's posted operations have ended: one pin per taking-part
rank, released by that rank's 'quiet' notice.

Why commands ride in the step broadcast rather than in Ray calls or a separate socket: the
prefill ranks must post a step's sends for exactly the requests and blocks of that step, in
the same order as the driver, and the broadcast already orders every rank's steps. Commands
between steps (open, finish, abort, reserve) go as a broadcast of their own from the engine
thread, so they too are in order with the steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq

from workers.errors import HandshakeMismatch, TransferFailed
from workers.kv_transfer.base import (
    KVReceiver,
    KVSender,
    OnDone,
    OnFailed,
    TransferState,
)
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.layout import KVLayout
from workers.kv_transfer.messages import (
    RankAbort,
    RankConnect,
    RankExpect,
    RankFinish,
    RankNotice,
    RankOpen,
    RankSetup,
    RankSpans,
)
from workers.kv_transfer.packing import KVCaches
from workers.kv_transfer.rank_routes import GroupAddress, RankShape, routes
from workers.kv_transfer.receiver import Receiver
from workers.kv_transfer.torch_sender import TorchSender
from workers.kv_transfer.transfer_table import TransferTable
from workers.protocol import decode, encode

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 60.0
EXPECT_TIMEOUT_S = 10.0
_MARGIN_S = 5.0
"""The worker-level deadline trails the ranks' own, so a rank's timeout names itself."""


class RankedEnd:
    """What both roles share: the local end, the ranks' notices, the worker-level table.
    `channel`: the driver's RankGroup (attach / post side payloads); `on_loop(fn)`: runs
    `fn` on the engine thread (now if this is it), where every broadcast must go."""

    def __init__(self, role: str, shape: RankShape, channel, on_loop: Callable,
                 config: TransferConfig, kv_transport: str, sender_id: str,
                 on_done: OnDone | None, on_failed: OnFailed | None):
        self.shape = shape
        self.world = shape.tp * shape.pp
        self.config = config
        self._channel = channel
        self._on_loop = on_loop
        self._on_done = on_done
        self._on_failed = on_failed
        self.table = TransferTable(self._done, self._failed)
        self._ranks: dict[str, list[int]] = {}
        """request id -> the other ranks that take part."""
        self._lock = threading.Condition()
        self._expected: dict[str, set[int]] = {}
        self._ready: dict[int, str] = {}
        self._ctx = zmq.Context.instance()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        port = self._pull.bind_to_random_port(f"tcp://{config.host}")
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="kv-rank-notices",
                                        daemon=True)
        self._thread.start()
        self._command(RankSetup(role, kv_transport, config.host, config.max_pairs,
                                f"tcp://{config.host}:{port}", sender_id))
        self.rank_addresses = self._wait_ready()

    # ---- the ranks -------------------------------------------------------------------------

    def _command(self, *commands) -> None:
        """Broadcasts commands to the other ranks now (from the engine thread; soon in it from
        any other)."""
        blobs = [encode(c) for c in commands]
        self._on_loop(lambda: self._channel.post(blobs))

    def _wait_ready(self) -> list[str]:
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        with self._lock:
            while len(self._ready) < self.world - 1:
                if not self._lock.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{self.world - 1 - len(self._ready)} ranks did not set "
                                       f"up their KV transfer in {SETUP_TIMEOUT_S:g} s")
            return [self._ready[r] for r in range(1, self.world)]

    def _listen(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        while not self._closed.is_set():
            if poller.poll(int(self.config.tick_s * 1000)):
                while self._pull.poll(0):
                    self._notice(decode(self._pull.recv()))
            self.table.expire()

    def _notice(self, notice: RankNotice) -> None:
        if notice.kind == "ready":
            with self._lock:
                self._ready[notice.rank] = notice.address
                self._lock.notify_all()
        elif notice.kind == "expected":
            with self._lock:
                self._expected.setdefault(notice.request_id, set()).add(notice.rank)
                self._lock.notify_all()
        elif notice.kind == "quiet":
            self.table.unpin(notice.request_id)
        elif notice.kind == "ended":
            self.rank_ended(notice.rank, notice.request_id, TransferState(notice.state),
                            notice.reason, notice.num_bytes, notice.seconds, notice.peer_bytes)

    # ---- the worker-level transfer ---------------------------------------------------------

    def _add(self, request_id: str, timeout_s: float | None, ranks: list[int],
             local: bool, **fields) -> None:
        """Opens the worker-level transfer over `ranks` (others) and the local end."""
        timeout_s = (timeout_s or self.config.timeout_s) + _MARGIN_S
        count = len(ranks) + int(local)
        self.table.add(request_id, timeout_s, cells_needed=count, **fields)
        self.table.pin(request_id, count)
        self._ranks[request_id] = ranks

    def rank_ended(self, rank: int, rid: str, state: TransferState, reason: str,
                   num_bytes: int = 0, seconds: float = 0.0, peer_bytes: dict | None = None,
                   extra: dict | None = None) -> None:
        """A rank's own transfer of `rid` is terminal (rank 0: the local end's callback)."""
        if state is not TransferState.DONE:
            self.table.end(rid, TransferState.FAILED, f"rank {rank}: {reason}")
            return
        record = self.table.get(rid)
        if record is not None:
            record.seconds = max(record.seconds, seconds)
            for peer, moved in (peer_bytes or {}).items():
                record.peer_bytes[(rank, peer)] = moved
        self.table.add_part(rid, rank, 1, num_bytes, 0.0, extra or {})

    def _done(self, rid: str, extra: dict) -> None:
        self._ranks.pop(rid, None)
        if self._on_done is not None:
            self._on_done(rid, extra)

    def _failed(self, rid: str, state: TransferState, reason: str) -> None:
        """Any rank failed, or the worker aborted: every rank's end stops."""
        self.abort_local(rid)
        ranks = self._ranks.pop(rid, [])
        if ranks:
            self._command(RankAbort(rid))
        if self._on_failed is not None:
            self._on_failed(rid, state, reason)

    def abort_local(self, rid: str) -> None:
        raise NotImplementedError

    # ---- the driver's own end (rank 0) -----------------------------------------------------

    def local_done(self, rid: str, extra: dict) -> None:
        """The local end's on_done: rank 0's part of the transfer is terminal."""
        record = self.local.table.get(rid)
        moved = (record.num_bytes, record.seconds, dict(record.peer_bytes)) if record else ()
        self.rank_ended(0, rid, TransferState.DONE, "", *moved, extra=extra)

    def local_failed(self, rid: str, state: TransferState, reason: str) -> None:
        self.rank_ended(0, rid, state, reason)

    def path(self, peer: str) -> str | None:
        return self.local.path(peer)

    def bandwidth(self, peer: str) -> float | None:
        return self.local.bandwidth(peer)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self.table.fail_all("closed")
        self._pull.close(linger=0)
        self.local.close()


class GroupSender(RankedEnd, KVSender):
    """Prefill worker of several ranks (driver side). See the module doc and KVSender."""

    def __init__(self, layout: KVLayout, kv_caches: KVCaches, config: TransferConfig,
                 shape: RankShape, channel, on_loop: Callable, kv_transport: str,
                 on_done: OnDone | None = None, on_failed: OnFailed | None = None,
                 sender_id: str = "prefill"):
        self.layout = layout
        self.local = TorchSender(layout, kv_caches, config, self.local_done, self.local_failed,
                                 f"{sender_id}-r0", shape, 0)
        self._fence = False
        super().__init__("prefill", shape, channel, on_loop, config, kv_transport, sender_id,
                         on_done, on_failed)

    def open(self, request_id: str, dest: str, dest_block_ids: list[int],
             num_tokens: int | None = None, timeout_s: float | None = None) -> None:
        try:
            by_rank = routes(self.layout, self.shape, dest)
        except HandshakeMismatch as err:
            self.table.add(request_id, timeout_s or self.config.timeout_s, peer=dest)
            self.table.finish(request_id, TransferState.FAILED, str(err), err)
            return
        ranks = [rank for rank in sorted(by_rank) if rank != 0]
        self._add(request_id, timeout_s, ranks, 0 in by_rank, peer=dest)
        # The ranks open first: an abort the local open may cause reaches them after it.
        if ranks:
            self._command(RankOpen(request_id, dest, list(dest_block_ids), num_tokens,
                                   timeout_s))
        if 0 in by_rank:
            self.local.open(request_id, dest, dest_block_ids, num_tokens, timeout_s)
            self.local.when_quiet(request_id, lambda: self.table.unpin(request_id))

    def stream_hook(self) -> GroupSender:
        return self

    def before_step(self, spans) -> None:
        self.local.before_step(spans)
        remote = [[s.request_id, s.start, s.end, s.block_table] for s in spans
                  if self._ranks.get(s.request_id)]
        if remote or self._fence:
            self._channel.attach([encode(RankSpans(remote, self._fence))])
            self._fence = False

    def layer_done(self, local_layer: int) -> None:
        self.local.layer_done(local_layer)

    def fence(self) -> None:
        self.local.fence()
        self._fence = True

    def finish(self, request_id: str, src_block_ids: list[int] | None = None,
               extra: dict | None = None, num_tokens: int | None = None) -> None:
        if self._ranks.get(request_id):
            self._command(RankFinish(request_id, dict(extra or {})))
        self.local.finish(request_id, extra=extra)

    def forget(self, request_id: str) -> None:
        self.local.forget(request_id)

    def abort_local(self, rid: str) -> None:
        self.local.abort(rid)
        self.local.forget(rid)

    def send(self, request_id, dest, src_block_ids, dest_block_ids, extra=None,
             num_tokens=None, timeout_s=None) -> None:
        raise TransferFailed(request_id, "a worker of several ranks streams its KV "
                                         "(open / finish), never sends it whole")

    def connect(self, dest: str) -> None:
        self.local.connect(dest)
        self._command(RankConnect(dest))

    def pairs(self) -> list[str]:
        return self.local.pairs()


class GroupReceiver(RankedEnd, KVReceiver):
    """Decode worker of several ranks (driver side): `address` is the group address of every
    rank's receiver (workers/kv_transfer/rank_routes.py). See the module doc."""

    def __init__(self, layout: KVLayout, kv_caches: KVCaches, config: TransferConfig,
                 shape: RankShape, channel, on_loop: Callable, kv_transport: str,
                 on_done: OnDone | None = None, on_failed: OnFailed | None = None):
        self.layout = layout
        self.local = Receiver(layout, kv_caches, config, self.local_done, self.local_failed)
        super().__init__("decode", shape, channel, on_loop, config, kv_transport, "decode",
                         on_done, on_failed)
        self.address = GroupAddress(shape.tp, shape.pp,
                                    (self.local.address, *self.rank_addresses)).encode()
        self.refusals = self.local.refusals

    def expect(self, request_id: str, block_ids: list[int],
               timeout_s: float | None = None) -> None:
        """Every rank's receiver expects its slice of these blocks before this returns (so
        no prefill rank's first part can reach a rank that does not know the request)."""
        ranks = list(range(1, self.world))
        self._add(request_id, timeout_s, ranks, True, block_ids=block_ids)
        self._command(RankExpect(request_id, list(block_ids), timeout_s))
        self.local.expect(request_id, block_ids, timeout_s)
        self.local.when_quiet(request_id, lambda: self.table.unpin(request_id))
        deadline = time.monotonic() + EXPECT_TIMEOUT_S
        with self._lock:
            while len(self._expected.get(request_id, ())) < len(ranks):
                if not self._lock.wait(max(0.0, deadline - time.monotonic())):
                    self.table.end(request_id, TransferState.FAILED, "ranks did not expect")
                    raise TransferFailed(request_id, "decode ranks did not register the "
                                                     f"reservation in {EXPECT_TIMEOUT_S:g} s")
            self._expected.pop(request_id, None)

    def abort_local(self, rid: str) -> None:
        self.local.abort(rid)

    def peers(self) -> list[str]:
        return self.local.peers()
