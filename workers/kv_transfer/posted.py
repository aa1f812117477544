"""Posted torch.distributed sends/receives that still touch requests' blocks.

A posted NCCL (or gloo) operation cannot be recalled: until it ends, its request's blocks stay
pinned (TransferTable.pin), however the transfer itself ended. One waiter thread per peer
waits for that peer's operations in posting order (NCCL: a blocking-sync CUDA event behind
the works, so the thread sleeps, and completion is seen within microseconds, not at the next
poll; gloo: its blocking `wait`, the only way gloo reports completion), then runs the
operation's `then` and unpins. The owner's control thread only looks for operations stuck
past every deadline they serve (`stuck_peers`) and tears those pairs down: it `cancel`s the
peer first (so an operation ended by the abort counts as failed), then aborts the
communicator, which ends NCCL's kernels (gloo's at its own timeout, or when the peer's
connection drops).
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from workers.kv_transfer.transfer_table import TransferTable

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Posted:
    """The works of one grouped post to one pair, and the requests whose blocks they use.
    Compared by identity: two posts of equal fields are still two posts to end."""

    peer: str
    works: list
    request_ids: list[str]
    then: Callable[[bool], None] | None = None
    """Runs once, on the waiter thread, when the works end (True: all succeeded); before
    the requests are unpinned, so it may still read or write their blocks."""
    posted_at: float = 0.0
    cancelled: bool = False
    staging: list = field(default_factory=list)
    """Staging buffers the works read or write: held until they end."""


class PostedOps:
    """The pending operations of one transfer end, each peer's waited for by its own thread."""

    def __init__(self, table: TransferTable, device: torch.device, op_timeout_s: float):
        self._table = table
        self._device = device
        self._op_timeout = datetime.timedelta(seconds=op_timeout_s)
        """gloo: the longest a wait lasts (a gloo send's wait has no timeout of its own, and
        a gloo pair cannot be aborted: a send to a peer that vanished would wait forever)."""
        self._items: list[Posted] = []
        self._waiters: dict[str, queue.SimpleQueue] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def add(self, posted: Posted) -> None:
        with self._lock:
            self._items.append(posted)
            waiter = self._waiters.get(posted.peer)
            if waiter is None:
                waiter = self._waiters[posted.peer] = queue.SimpleQueue()
                thread = threading.Thread(target=self._wait_each, args=(waiter,), daemon=True,
                                          name=f"kv-wait-{posted.peer}")
                self._threads.append(thread)
                thread.start()
        waiter.put(posted)

    def pending(self, peer: str | None = None) -> bool:
        with self._lock:
            return any(peer is None or p.peer == peer for p in self._items)

    def stuck_peers(self, stuck: Callable[[Posted], bool]) -> set[str]:
        """Peers with an operation that `stuck` says will not end by itself. Decided under the
        lock, so an operation that has just ended (and may have let its blocks go, and a new
        transfer start on the pair) is never taken for stuck."""
        with self._lock:
            return {p.peer for p in self._items if not p.cancelled and stuck(p)}

    def cancel(self, peer: str) -> None:
        """Before aborting the peer's communicator: its operations count as failed, however
        they end; its waiter thread exits after them."""
        with self._lock:
            for posted in self._items:
                if posted.peer == peer:
                    posted.cancelled = True
            waiter = self._waiters.pop(peer, None)
        if waiter is not None:
            waiter.put(None)

    def close(self) -> None:
        """Cancels every peer and waits (briefly) for the waiters: no work, and so no
        communicator, outlives the owner."""
        with self._lock:
            peers = set(self._waiters)
        for peer in peers:
            self.cancel(peer)
        for thread in self._threads:
            thread.join(timeout=1.0)
        with self._lock:
            self._items.clear()

    def fence(self) -> None:
        """Orders the caller's current CUDA stream after every pending NCCL operation."""
        if self._device.type != "cuda":
            return
        with self._lock:
            items = list(self._items)
        for posted in items:
            for work in posted.works:
                try:
                    work.wait()
                except RuntimeError:
                    pass  # failed: its pair is being torn down, nothing left to order after

    def _wait_each(self, waiter: queue.SimpleQueue) -> None:
        stream = None
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
            stream = torch.cuda.Stream(self._device)
        while (posted := waiter.get()) is not None:
            ok = _wait(posted.works, stream, self._op_timeout)
            self._end(posted, ok and not posted.cancelled)
            del posted  # no reference to a work outlives its wait (a communicator's teardown)

    def _end(self, posted: Posted, ok: bool) -> None:
        with self._lock:
            if posted not in self._items:
                return
            self._items.remove(posted)
        try:
            if posted.then is not None:
                posted.then(ok)
        finally:
            for request_id in posted.request_ids:
                self._table.unpin(request_id)


def _wait(works: list, stream, timeout: datetime.timedelta) -> bool:
    """Blocks until the works end (gloo: or `timeout` passes); False if any failed."""
    try:
        if stream is None:
            for work in works:
                work.wait(timeout)
            return True
        with torch.cuda.stream(stream):
            for work in works:
                work.wait()  # orders `stream` after the work (no host wait)
        done = torch.cuda.Event(blocking=True)
        done.record(stream)
        done.synchronize()  # sleeps until then
        return True
    except RuntimeError as err:
        log.info("posted transfer operation failed: %s", err)
        return False
