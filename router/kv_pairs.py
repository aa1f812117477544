"""The router's view of prefill/decode KV pairs: set up at admission, asked after a loss.

A new decode worker is introduced to each prefill worker (and a new prefill worker to each
decode worker) when it is admitted, so pairs are built off every request's path (DESIGN.md,
"Deadlock at first contact"). When a prefill worker is lost, the decode workers say which of
its requests' KV had already landed (those go on without it; the others migrate or fail).
"""

from __future__ import annotations

from collections.abc import Callable

from router.router_state import InFlight, WorkerState
from router.worker_client import WorkerClient
from router.worker_handle import WorkerGone

Workers = Callable[[str], WorkerClient]


class KvPairs:
    """RouterCore's collaborator for pairing (`introduce`) and the KV-landed check."""

    def __init__(self, workers: dict[str, WorkerState], worker: Workers):
        self.workers = workers
        self._worker = worker

    async def introduce(self, worker_id: str) -> None:
        """Sets up KV pairs at admission: a new decode worker with each prefill worker, a new
        prefill worker with each decode worker."""
        worker = self.workers[worker_id]
        ready = [(wid, w) for wid, w in self.workers.items() if w.ready]
        if worker.role == "decode" and worker.kv_address:
            for wid, other in ready:
                if other.role == "prefill":
                    await self._connect(wid, [worker.kv_address])
        elif worker.role == "prefill":
            addresses = [w.kv_address for _, w in ready if w.role == "decode" and w.kv_address]
            if addresses:
                await self._connect(worker_id, addresses)

    async def landed(self, lost: str, entries: list[InFlight]) -> set[str]:
        """Attempt ids of the lost prefill worker's requests whose KV already landed on their
        decode worker (the 'shipped' news may have died with the prefill worker)."""
        by_decode: dict[str, list[str]] = {}
        for entry in entries:
            if entry.life.prefill == lost and entry.life.decode is not None:
                by_decode.setdefault(entry.life.decode, []).append(entry.request.attempt_id)
        survivors: set[str] = set()
        for decode, ids in by_decode.items():
            if self.workers[decode].ready:
                try:
                    survivors.update(await self._worker(decode).landed(ids))
                except WorkerGone:
                    pass
        return survivors

    async def _connect(self, worker_id: str, addresses: list[str]) -> None:
        try:
            await self._worker(worker_id).connect(addresses)
        except WorkerGone:
            pass
