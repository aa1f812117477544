"""Per-transfer state with deadlines: the bookkeeping both ends of a KV transfer share.

Pure and thread-safe: no sockets, no torch. Backends call `start`, `add_part` and `finish`;
a watchdog calls `expire`. Callbacks run outside the lock, exactly once per transfer.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from workers.errors import DuplicateRequest, KvrelayError, TransferFailed, TransferTimeout
from workers.kv_transfer.base import OnDone, OnFailed, TransferState


@dataclass
class TransferRecord:
    request_id: str
    state: TransferState
    deadline: float
    """time.monotonic() after which the transfer is FAILED."""
    timeout_s: float
    created: float
    peer: str = ""
    peers: tuple[str, ...] = ()
    """Sender: every receiver address this transfer sends to (a decode worker of several
    ranks: the ones this rank feeds); () means just `peer`."""
    block_ids: list[int] = field(default_factory=list)
    cells_needed: int = 0
    """Receiver: (layer, kv head) cells its slice has; DONE once all have landed."""
    cells_done: int = 0
    parts: set = field(default_factory=set)
    """Receiver: the plans that have landed; a part sent twice (a retry) counts once."""
    num_bytes: int = 0
    seconds: float = 0.0
    """Wire time of the data (send/recv), for metrics and GB/s."""
    extra: dict = field(default_factory=dict)
    reason: str = ""
    error: KvrelayError | None = None
    """FAILED: the typed error (TransferTimeout, HandshakeMismatch, TransferFailed)."""
    finished: threading.Event = field(default_factory=threading.Event)
    busy: threading.RLock = field(default_factory=threading.RLock)
    """Held while this end reads or writes the request's blocks (pack, unpack); `abort` and
    the deadline take it, so once they return no host-side copy touches the blocks again."""
    pins: int = 0
    """Posted sends/receives (torch stream) that still read or write the request's blocks.
    They cannot be recalled, so the blocks stay held until they end: see `when_quiet`."""
    on_quiet: list = field(default_factory=list)
    parts_expected: dict = field(default_factory=dict)
    """Receiver, torch stream: sender -> parts its StreamEnd announced."""
    parts_landed: dict = field(default_factory=dict)
    """Receiver, torch stream: sender -> parts of it that landed."""
    acked: set = field(default_factory=set)
    """Receiver, torch stream: senders told their parts landed."""
    first_posted: float = 0.0
    """perf_counter() of the first data posted for this transfer (wire time starts)."""
    peer_bytes: dict = field(default_factory=dict)
    """Sender: bytes posted to each receiver address (per rank pair, for tests and logs)."""

    def touches(self, peer: str) -> bool:
        """Whether this transfer uses the pair with `peer`."""
        return peer == self.peer or peer in self.peers


class TransferTable:
    """Request id -> TransferRecord, keeping the last `keep_finished` terminal records so a
    late `state()` or `wait()` still answers. The in-flight ones are indexed apart: `live`,
    `expire` (both on every wake-up of a control thread) and `add` cost O(in flight), not
    O(kept): over 4096 kept records each scan took ~3-5 ms of GIL-holding host time (2-core
    CPU), paid on every message a pair's control thread handled."""

    def __init__(self, on_done: OnDone | None = None, on_failed: OnFailed | None = None,
                 keep_finished: int = 4096):
        self._on_done = on_done
        self._on_failed = on_failed
        self._keep_finished = keep_finished
        self._records: dict[str, TransferRecord] = {}
        self._live: dict[str, TransferRecord] = {}
        """The non-terminal records of `_records`."""
        self._finished: OrderedDict[str, None] = OrderedDict()
        """The terminal ones' ids, oldest outcome first (trimmed to `keep_finished`)."""
        self._lock = threading.Lock()

    def add(self, request_id: str, timeout_s: float, *, peer: str = "",
            block_ids: list[int] | None = None, cells_needed: int = 0,
            extra: dict | None = None, peers: tuple[str, ...] = ()) -> TransferRecord:
        """A new in-flight (RESERVED) transfer; a terminal one of the same id is replaced."""
        now = time.monotonic()
        record = TransferRecord(request_id, TransferState.RESERVED, now + timeout_s, timeout_s,
                                now, peer, tuple(peers), list(block_ids or []),
                                cells_needed, extra=dict(extra or {}))
        with self._lock:
            old = self._records.get(request_id)
            if old is not None and not old.state.terminal:
                raise DuplicateRequest(request_id)
            self._finished.pop(request_id, None)
            self._records[request_id] = self._live[request_id] = record
            while len(self._finished) > self._keep_finished:
                del self._records[self._finished.popitem(last=False)[0]]
        return record

    def get(self, request_id: str) -> TransferRecord | None:
        with self._lock:
            return self._records.get(request_id)

    def in_flight(self, request_id: str) -> bool:
        record = self.get(request_id)
        return record is not None and not record.state.terminal

    def live(self) -> list[TransferRecord]:
        with self._lock:
            return list(self._live.values())

    def start(self, request_id: str) -> TransferRecord | None:
        """RESERVED -> SENDING; None (and no change) if the transfer is already terminal."""
        with self._lock:
            record = self._records.get(request_id)
            if record is None or record.state.terminal:
                return None
            record.state = TransferState.SENDING
            return record

    def add_part(self, request_id: str, part: Hashable, cells: int, num_bytes: int,
                 seconds: float, extra: dict) -> bool:
        """Receiver: one part's data (`cells` (layer, kv head) cells, identified by `part`, e.g.
        its TransferPlan) landed. Marks DONE once every cell has; True if it did."""
        with self._lock:
            record = self._records.get(request_id)
            if record is None or record.state.terminal:
                return False
            if part not in record.parts:
                record.parts.add(part)
                record.cells_done += cells
            record.num_bytes += num_bytes
            record.seconds += seconds
            record.extra.update(extra)
            complete = record.cells_done >= record.cells_needed
        if complete:
            return self.finish(request_id, TransferState.DONE)
        return False

    def finish(self, request_id: str, state: TransferState, reason: str = "",
               error: KvrelayError | None = None) -> bool:
        """Moves an in-flight transfer to a terminal state and fires its callback once.
        Returns False if it was already terminal (or unknown): the first outcome wins.
        FAILED without `error` records TransferFailed(request_id, reason)."""
        assert state.terminal, state
        if state is TransferState.FAILED and error is None:
            error = TransferFailed(request_id, reason)
        with self._lock:
            record = self._records.get(request_id)
            if record is None or record.state.terminal:
                return False
            record.state = state
            del self._live[request_id]
            self._finished[request_id] = None
            record.reason = reason or str(error or "")
            record.error = error
        record.finished.set()
        self._fire_quiet(record)
        if state is TransferState.DONE:
            if self._on_done is not None:
                self._on_done(request_id, dict(record.extra))
        elif self._on_failed is not None:
            self._on_failed(request_id, state, reason)
        return True

    def pin(self, request_id: str, count: int = 1) -> bool:
        """Counts `count` posted operations on the request's blocks; False (nothing counted)
        if the transfer is unknown or terminal."""
        with self._lock:
            record = self._records.get(request_id)
            if record is None or record.state.terminal:
                return False
            record.pins += count
            if not record.first_posted:
                record.first_posted = time.perf_counter()
            return True

    def unpin(self, request_id: str, count: int = 1) -> None:
        """`count` posted operations ended (done, failed or their communicator aborted)."""
        with self._lock:
            record = self._records.get(request_id)
            if record is None:
                return
            record.pins = max(0, record.pins - count)
        self._fire_quiet(record)

    def when_quiet(self, request_id: str, fn) -> None:
        """Runs `fn()` once the transfer is terminal (or unknown) and no posted operation
        touches its blocks: at once, in this thread, if that is already so; else later, in
        the thread that ends the last operation. The worker frees the blocks in `fn`."""
        with self._lock:
            record = self._records.get(request_id)
            if record is not None and (record.pins or not record.state.terminal):
                record.on_quiet.append(fn)
                return
        fn()

    def _fire_quiet(self, record: TransferRecord) -> None:
        with self._lock:
            if record.pins or not record.state.terminal:
                return
            callbacks, record.on_quiet = record.on_quiet, []
        for fn in callbacks:
            fn()

    def land_part(self, request_id: str, sender, seconds_end: float) -> bool:
        """Receiver, torch stream: one StreamPart of the request from `sender` landed."""
        with self._lock:
            record = self._records.get(request_id)
            if record is None or record.state.terminal:
                return False
            record.parts_landed[sender] = record.parts_landed.get(sender, 0) + 1
            record.seconds = seconds_end - record.first_posted if record.first_posted else 0.0
            return True

    def stream_ended(self, request_id: str, sender, parts: int, cells: int,
                     extra: dict) -> bool:
        """Receiver, torch stream: a sender's StreamEnd; False if the transfer is gone."""
        with self._lock:
            record = self._records.get(request_id)
            if record is None or record.state.terminal:
                return False
            record.parts_expected[sender] = parts
            record.cells_done += cells
            record.extra.update(extra)
            return True

    def settle(self, request_id: str) -> list:
        """Receiver, torch stream: the senders whose announced parts have all landed and
        who were not told yet (ack them); marks DONE once they cover the slice."""
        with self._lock:
            record = self._records.get(request_id)
            if record is None or record.state.terminal:
                return []
            landed = [sender for sender, parts in record.parts_expected.items()
                      if record.parts_landed.get(sender, 0) >= parts]
            fresh = [sender for sender in landed if sender not in record.acked]
            record.acked.update(fresh)
            done = len(landed) == len(record.parts_expected) and \
                record.cells_done >= record.cells_needed
        if done:
            self.finish(request_id, TransferState.DONE)
        return fresh

    def expire(self, now: float | None = None) -> list[TransferRecord]:
        """Marks every in-flight transfer past its deadline FAILED; returns them."""
        now = time.monotonic() if now is None else now
        with self._lock:
            late = [r for r in self._live.values() if r.deadline <= now]
        expired = []
        for record in late:
            elapsed = now - record.created
            error = TransferTimeout(record.request_id, record.timeout_s, elapsed)
            reason = f"timeout: {error}"
            with record.busy:
                if self.finish(record.request_id, TransferState.FAILED, reason, error):
                    expired.append(record)
        return expired

    def wait(self, request_id: str, timeout_s: float | None = None) -> TransferState | None:
        record = self.get(request_id)
        if record is None:
            return None
        record.finished.wait(timeout_s)
        return record.state

    def end(self, request_id: str, state: TransferState, reason: str) -> bool:
        """`finish` once no copy is touching the request's blocks (abort, close)."""
        record = self.get(request_id)
        if record is None:
            return False
        with record.busy:
            return self.finish(request_id, state, reason)

    def fail_all(self, reason: str) -> None:
        for record in self.live():
            self.end(record.request_id, TransferState.FAILED, reason)
