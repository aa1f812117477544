"""The prefill side's pairs of the torch transport, one per receiver address.

A pair is a ZMQ DEALER for control and a two-rank communicator (NCCL between GPUs, gloo on
CPU) built eagerly when the pair is set up (`connect`, at worker start or join): handshake,
warm-up exchange, bandwidth probe. One control thread owns the sockets: it sets pairs up,
sends what other threads hand it (`command`), turns the receivers' acks into transfer states,
and tears down a pair whose sends are stuck past their deadlines, that is idle, or that is
evicted for a new one (at most `config.max_pairs`); the next `connect` builds it afresh.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import torch
import zmq

from workers.errors import HandshakeMismatch
from workers.kv_transfer.base import TransferState
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.layout import KVLayout, TransferPlan, check_compatible, plan_transfer
from workers.kv_transfer.messages import Hello, HelloReply, PairReport, Reply
from workers.kv_transfer.outbox import Outbox
from workers.kv_transfer.pair_group import SENDER_RANK, PairGroup, op_timeout
from workers.kv_transfer.posted import Posted, PostedOps
from workers.kv_transfer.stream_plan import is_direct
from workers.kv_transfer.timeline import mark
from workers.kv_transfer.transfer_table import TransferTable
from workers.protocol import decode, encode

log = logging.getLogger(__name__)


class TorchPair:
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



class TorchPairs:
    """See the module doc. The engine thread calls `connect`, `ready` and `command`; the
    control thread does the rest."""

    def __init__(self, layout: KVLayout, config: TransferConfig, sender_id: str,
                 device: torch.device, table: TransferTable, posted: PostedOps):
        self.layout = layout
        self.config = config
        self.sender_id = sender_id
        self.device = device
        self.table = table
        self._posted = posted
        self._pairs: dict[str, TorchPair] = {}
        self._lock = threading.Lock()
        self._ctx = zmq.Context.instance()
        self._outbox = Outbox(self._ctx, "kv-send-outbox")
        self._tokens = itertools.count()
        self._on_wire: dict[bytes, threading.Event] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kv-send", daemon=True)
        self._thread.start()

    def get(self, dest: str) -> TorchPair | None:
        return self._pairs.get(dest)

    def connect(self, dest: str) -> None:
        """Sets the pair with `dest` up in the background (idempotent). Past
        `config.max_pairs`, the control thread evicts the least recently used idle pair as
        soon as there is one (until then the bound gives: a busy pair is never cut)."""
        with self._lock:
            if dest in self._pairs:
                return
            self._pairs[dest] = TorchPair(dest, time.monotonic() + self.config.connect_timeout_s)
        self.command(dest, b"connect")

    def _least_recently_used(self) -> str | None:
        """The idle pair to evict for a new one (None: every pair is busy)."""
        live = self.table.live()
        idle = [p for p in self._pairs.values() if p.ready.is_set()
                and not any(r.touches(p.dest) for r in live)
                and not self._posted.pending(p.dest)]
        return min(idle, key=lambda p: p.last_used).dest if idle else None

    def ready(self, request_id: str, dest: str) -> TorchPair | None:
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

    def command(self, dest: str, *payloads: bytes,
                on_wire: threading.Event | None = None) -> None:
        """Hands `payloads` to the control thread for `dest`, in order, in one wake-up;
        `on_wire` is set once they have been handed to the pair's socket (or dropped: no
        pair)."""
        token = b""
        if on_wire is not None:
            token = b"%d" % next(self._tokens)
            self._on_wire[token] = on_wire
        self._outbox.put([dest.encode(), token, *payloads])

    # ---- control thread --------------------------------------------------------------------

    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        poller = zmq.Poller()
        poller.register(self._outbox.socket, zmq.POLLIN)
        while not self._closed.is_set():
            ready = dict(poller.poll(int(self.config.tick_s * 1000)))
            while self._outbox.socket.poll(0):
                dest, token, *payloads = self._outbox.socket.recv_multipart()
                for payload in payloads:
                    self._outgoing(poller, dest.decode(), payload)
                if token:
                    self._on_wire.pop(token).set()
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
        elif payload.startswith(b"ready:"):
            pair = self._pairs.get(dest)
            if pair is not None and pair.sock is not None:
                pair.sock.send(encode(PairReport(pair.path or "", pair.gbps or 0.0)))
                pair.last_used = time.monotonic()  # idle counts from set-up's end
                pair.ready.set()
                log.info("kv pair %s -> %s: path %s, %.2f GB/s", self.sender_id, dest,
                         pair.path, pair.gbps or 0.0)
        elif payload.startswith(b"broken:"):
            pair = self._pairs.get(dest)
            if pair is not None and pair.sock is not None:
                self._teardown(poller, dest, payload[7:].decode())
        else:
            pair = self._pairs.get(dest)
            if pair is not None and pair.sock is not None:
                pair.sock.send(payload)
                mark("s.ctl_fwd")

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

    def _incoming(self, poller: zmq.Poller, pair: TorchPair, msg) -> None:
        if isinstance(msg, HelloReply):
            self._hello_reply(poller, pair, msg)
        elif isinstance(msg, Reply) and msg.ok:  # DONE once every receiver it feeds acked
            mark("s.ack")
            self.table.add_part(msg.request_id, pair.dest, 1, 0, 0.0, {})
        elif isinstance(msg, Reply):
            self.table.end(msg.request_id, TransferState.FAILED, msg.reason)
            if msg.reason.startswith("stale pair"):
                self._teardown(poller, pair.dest, msg.reason)

    def _hello_reply(self, poller: zmq.Poller, pair: TorchPair, reply: HelloReply) -> None:
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
            log.warning("kv pair %s -> %s refused: %s", self.sender_id, pair.dest, err)
            return
        pair.direct = is_direct(pair.plan, self.layout, remote)
        pair.generation = reply.generation
        host = pair.dest.split("://", 1)[1].rsplit(":", 1)[0]
        threading.Thread(target=self._build, args=(pair, host, reply.store_port),
                         name=f"kv-pair-{pair.dest}", daemon=True).start()

    def _build(self, pair: TorchPair, host: str, store_port: int) -> None:
        """Pair thread: communicator (with warm-up), then the probe; reports to the loop."""
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            pair.group = PairGroup(None, host, store_port, SENDER_RANK, pair.generation,
                                   self.device, self.config.connect_timeout_s,
                                   op_timeout(self.config, self.device))
            pair.path = pair.group.backend
            pair.gbps = probe_sends(pair.group, self.config, self.device)
            self.command(pair.dest, b"ready:")
        except Exception as err:  # noqa: BLE001 - any set-up error: this pair only
            log.warning("kv pair %s -> %s: set-up failed: %r", self.sender_id, pair.dest,
                        err)
            pair.error = err
            pair.ready.set()
            self.command(pair.dest, b"broken:" + repr(err).encode())

    def _stuck(self, posted: Posted) -> bool:
        """A posted send whose transfers are all past their deadline (or gone)."""
        now = time.monotonic()
        records = [self.table.get(rid) for rid in posted.request_ids]
        return all(r is None or (r.state.terminal and r.deadline < now) for r in records)

    def _teardown(self, poller: zmq.Poller, dest: str, why: str) -> None:
        """Drops a pair: fails the transfers on it, aborts its communicator (its posted sends
        end). The next `connect` or `open` builds it afresh.

        The transfers failed are those open when the pair goes (taken with it, under the
        lock `connect` takes): one opened afterwards is on the next pair. The abort runs on
        its own thread: a gloo group's can block until its pending operations time out
        (tens of seconds), which on this thread would stall every pair's acks and deadlines
        and, once it returned, fail transfers already on the next pair (it did, under load).
        """
        with self._lock:
            pair = self._pairs.pop(dest, None)
            lost = [r.request_id for r in self.table.live() if r.touches(dest)]
        if pair is None:
            return
        log.warning("kv pair %s -> %s torn down: %s", self.sender_id, dest, why)
        self._posted.cancel(dest)  # before the abort: what it ends counts as failed
        for request_id in lost:
            self.table.end(request_id, TransferState.FAILED, f"pair lost: {why}")
        if pair.group is not None:
            threading.Thread(target=pair.group.close, name=f"kv-close-{dest}",
                             daemon=True).start()
        if pair.sock is not None:
            poller.unregister(pair.sock)
            pair.sock.close(linger=0)
            pair.sock = None
        pair.error = pair.error or RuntimeError(why)
        pair.ready.set()

    def _evict_idle(self, poller: zmq.Poller) -> None:
        now = time.monotonic()
        live = self.table.live()
        for pair in list(self._pairs.values()):
            busy = any(r.touches(pair.dest) for r in live)
            if not pair.ready.is_set() and now > pair.deadline:
                self._teardown(poller, pair.dest, "no handshake reply")
            elif pair.ready.is_set() and not busy \
                    and now - pair.last_used > self.config.idle_evict_s \
                    and not self._posted.pending(pair.dest):
                self._teardown(poller, pair.dest, "idle")
        while len(self._pairs) > self.config.max_pairs and \
                (victim := self._least_recently_used()) is not None:
            self._teardown(poller, victim, f"evicted: more than {self.config.max_pairs} pairs")

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

    def sends(self, peer: str) -> tuple[int, int]:
        """(messages, bytes) sent on the pair with `peer` so far; (0, 0) without one."""
        pair = self._pairs.get(peer)
        group = pair.group if pair is not None else None
        return (group.sends, group.sent_bytes) if group is not None else (0, 0)

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
        """Stops the control thread, fails what is in flight, closes every pair."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout=5)
        for on_wire in list(self._on_wire.values()):
            on_wire.set()
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
