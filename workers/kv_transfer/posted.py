"""Posted torch.distributed sends/receives that still touch requests' blocks.

A posted NCCL (or gloo) operation cannot be recalled: until it ends, its request's blocks stay
pinned (TransferTable.pin), however the transfer itself ended. The owner's control thread
polls them (`poll`), unpins what finished, and tears a pair down when its operations are
stuck past their deadline (aborting an NCCL communicator ends them). A gloo work reports
completion only from a blocking `wait` (and a timed-out wait breaks its pair), so gloo works
are waited for by one thread per peer, in posting order; they end at the latest at the
communicator's own timeout, or at once when the peer's connection drops.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.kv_transfer.transfer_table import TransferTable

log = logging.getLogger(__name__)

_DONE_WAIT = datetime.timedelta(seconds=1)


@dataclass
class Posted:
    """The works of one grouped post to one pair, and the requests whose blocks they use."""

    peer: str
    works: list
    request_ids: list[str]
    blocking: bool = False
    """gloo: only a waiter thread can tell when the works end (`result`)."""
    result: bool | None = None
    then: Callable[[bool], None] | None = None
    """Runs once, on the polling thread, when the works end (True: all succeeded); before
    the requests are unpinned, so it may still read or write their blocks."""
    extra: dict = field(default_factory=dict)


class PostedOps:
    """Thread-safe list of `Posted`, in posting order."""

    def __init__(self, table: TransferTable):
        self._table = table
        self._items: list[Posted] = []
        self._waiters: dict[str, queue.SimpleQueue] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def add(self, posted: Posted) -> None:
        with self._lock:
            self._items.append(posted)
            if not posted.blocking:
                return
            waiter = self._waiters.get(posted.peer)
            if waiter is None:
                waiter = self._waiters[posted.peer] = queue.SimpleQueue()
                thread = threading.Thread(target=_wait_each, args=(waiter,), daemon=True,
                                          name=f"kv-wait-{posted.peer}")
                self._threads.append(thread)
                thread.start()
        waiter.put(posted)

    def pending(self, peer: str | None = None) -> bool:
        with self._lock:
            return any(peer is None or p.peer == peer for p in self._items)

    def poll(self, stuck: Callable[[Posted], bool]) -> set[str]:
        """Ends what finished; returns the peers with a failed or stuck operation (to tear
        down, which ends the rest of theirs through `drop`)."""
        with self._lock:
            items = list(self._items)
        broken: set[str] = set()
        for posted in items:
            state = posted.result if posted.blocking else _state(posted.works)
            if state is None:
                if stuck(posted):
                    broken.add(posted.peer)
                continue
            self._end(posted, state)
            if not state:
                broken.add(posted.peer)
        return broken

    def drop(self, peer: str) -> None:
        """The peer's communicator was aborted: its operations are over, failed (gloo ones
        once their waiter returns)."""
        with self._lock:
            gone = [p for p in self._items if p.peer == peer and not p.blocking]
            waiter = self._waiters.pop(peer, None)
        if waiter is not None:
            waiter.put(None)  # the thread ends after the works queued before
        for posted in gone:
            self._end(posted, False)

    def drop_all(self) -> None:
        """Ends everything (the owner closes); waiter threads exit once their works end."""
        with self._lock:
            peers = {p.peer for p in self._items} | set(self._waiters)
        for peer in peers:
            self.drop(peer)
        for thread in self._threads:
            thread.join(timeout=1.0)
        with self._lock:
            self._items.clear()  # no work (and so no communicator) outlives the owner

    def fence(self) -> None:
        """Orders the caller's current CUDA stream after every pending operation."""
        with self._lock:
            items = list(self._items)
        for posted in items:
            for work in [] if posted.blocking else posted.works:
                try:
                    work.wait()
                except RuntimeError:
                    pass  # failed: its pair is being torn down, nothing left to order after

    def _end(self, posted: Posted, ok: bool) -> None:
        with self._lock:
            if posted not in self._items:
                return
            self._items.remove(posted)
        if posted.then is not None:
            posted.then(ok)
        for request_id in posted.request_ids:
            self._table.unpin(request_id)


def _wait_each(waiter: queue.SimpleQueue) -> None:
    while (posted := waiter.get()) is not None:
        try:
            for work in posted.works:
                work.wait()
            posted.result = True
        except RuntimeError as err:
            log.info("posted transfer operation failed: %s", err)
            posted.result = False
        del posted  # no reference to a work outlives its wait (a communicator's teardown)


def _state(works: list) -> bool | None:
    """None while any work runs; True when all succeeded; False when any failed."""
    try:
        if not all(work.is_completed() for work in works):
            return None
        for work in works:
            work.wait(_DONE_WAIT)  # finished already: returns at once, or raises its error
        return True
    except RuntimeError as err:
        log.warning("posted transfer operation failed: %s", err)
        return False
