"""The router's state machine: which worker holds which request, and what happens on failure.

`RouterCore` is plain asyncio code over `WorkerHandle`s (a Ray actor or an in-process object,
router/worker_handle.py), so it runs in tests without Ray. Per request it picks a decode worker
that reserves blocks, then a prefill worker that computes and ships the KV (disaggregated), or
one colocated worker; that placement is router/placement.py. A monitor task polls every
worker: the poll is the liveness ping and carries which requests ended. A worker that stops
answering is dropped; its requests go on where they can (a prefill worker died after its KV
landed on the decode worker) and otherwise end with a clear error chunk. They are not
retried: the prefill worker may already have streamed token 1, and a retry would stream it
twice. A worker that answers again (Ray restarted it: a new incarnation) is admitted again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from router.placement import Placement
from router.policies import blocks_needed, make_policy
from router.router_state import InFlight, RouterConfig, WorkerLost, WorkerState
from router.worker_handle import WorkerGone, WorkerHandle
from workers.errors import KvrelayError, NoReadyWorker, QueueFull
from workers.output_sender import OutputSender
from workers.protocol import GenerateRequest, OutputChunk
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class RouterCore(Placement):
    """Routes requests over registered workers; see the module docstring."""

    def __init__(self, config: RouterConfig):
        self.config = config
        self.workers: dict[str, WorkerState] = {}
        self.requests: dict[str, InFlight] = {}
        self.sender = OutputSender()
        self._policies = {
            "prefill": make_policy(config.prefill_policy),
            "decode": make_policy(config.decode_policy),
            "colocated": make_policy(config.colocated_policy),
        }
        self._monitor: asyncio.Task | None = None
        self.num_finished = 0
        self.num_failed = 0
        self.aborted_in_phase: Counter[str] = Counter()

    # ---- membership ---------------------------------------------------------------------

    def add_worker(self, worker_id: str, role: str, handle: WorkerHandle) -> None:
        """Registers a worker; it takes requests once a poll has answered."""
        self.workers[worker_id] = WorkerState(handle, role)

    @property
    def started(self) -> bool:
        return self._monitor is not None

    def start(self) -> None:
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop())

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        self.sender.close()

    async def wait_ready(self, timeout_s: float) -> None:
        """Polls until every registered worker answered once (or raises NoReadyWorker)."""
        deadline = time.monotonic() + timeout_s
        while True:
            await self.poll_all()
            waiting = [w for w in self.workers.values() if not w.ready]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise NoReadyWorker(waiting[0].role, len(self.workers))
            await asyncio.sleep(self.config.poll_interval_s)

    # ---- requests -----------------------------------------------------------------------

    async def submit(self, request: GenerateRequest) -> None:
        """Places `request` on workers; raises QueueFull, NoReadyWorker, NoCapacity or the
        decode worker's typed refusal (e.g. PromptTooLong)."""
        if len(self.requests) >= self.config.max_queue:
            raise QueueFull(1.0, len(self.requests), self.config.max_queue)
        params = SamplingParams.from_dict(request.sampling)
        num_prompt = len(request.prompt_token_ids)
        entry = InFlight(
            request,
            tokens=num_prompt + params.max_tokens,
            blocks=blocks_needed(num_prompt, self.config.block_size),
        )
        self.requests[request.request_id] = entry
        try:
            await self._place(entry)
        except BaseException:
            self._forget(request.request_id)
            raise

    async def abort(self, request_id: str) -> None:
        """Ends a request wherever it is; its blocks free on every worker it touched."""
        entry = self._forget(request_id)
        if entry is None:
            return
        self.aborted_in_phase[entry.phase] += 1
        await self._release_everywhere(entry, keep=None)
        self._send_final(entry, "abort")

    def _forget(self, request_id: str) -> InFlight | None:
        entry = self.requests.pop(request_id, None)
        for worker in self.workers.values():
            worker.requests.discard(request_id)
        return entry

    # ---- talking to workers -------------------------------------------------------------

    async def _call(self, worker_id: str, method: str, *args):
        """Calls a worker; a dead one is marked not ready and raises WorkerGone."""
        worker = self.workers[worker_id]
        try:
            return await worker.handle.call(method, *args)
        except WorkerGone:
            await self._lose(worker_id, "call failed")
            raise

    async def _call_quietly(self, worker_id: str | None, method: str, *args) -> None:
        if worker_id is None or worker_id not in self.workers:
            return
        try:
            await self._call(worker_id, method, *args)
        except WorkerGone:
            pass

    async def _release_everywhere(self, entry: InFlight, keep: str | None) -> None:
        rid = entry.request.request_id
        for worker_id in (entry.prefill, entry.decode, entry.colocated):
            if worker_id is not None and worker_id != keep:
                await self._call_quietly(worker_id, "abort", rid)

    def _send_final(self, entry: InFlight, reason: str, error: KvrelayError | None = None):
        self.sender.send(
            entry.request.output_address,
            OutputChunk(
                request_id=entry.request.request_id,
                finished=True,
                finish_reason=reason,
                error=str(error) if error else None,
                error_type=type(error).__name__ if error else None,
                num_prompt_tokens=len(entry.request.prompt_token_ids),
                worker_id="router",
            ),
        )

    # ---- monitoring ---------------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        while True:
            try:
                await self.poll_all()
            except Exception:  # the monitor must outlive any one bad poll
                log.exception("router poll failed")
            await asyncio.sleep(self.config.poll_interval_s)

    async def poll_all(self) -> None:
        await asyncio.gather(*(self._poll(wid) for wid in list(self.workers)))

    async def _poll(self, worker_id: str) -> None:
        worker = self.workers[worker_id]
        try:
            news = await asyncio.wait_for(
                worker.handle.call("poll"), timeout=self.config.poll_timeout_s
            )
        except (WorkerGone, asyncio.TimeoutError):
            await self._lose(worker_id, "poll failed")
            return
        if not news["alive"]:
            await self._lose(worker_id, "its engine loop stopped")
            return
        if worker.incarnation and news["incarnation"] != worker.incarnation:
            await self._lose(worker_id, "restarted")
        admitted = not worker.ready
        if admitted:
            log.info("worker %s (%s) admitted", worker_id, worker.role)
        worker.incarnation, worker.ready = news["incarnation"], True
        worker.kv_address = news.get("kv_address")
        if admitted:
            await self._introduce(worker_id)
        worker.free_blocks, worker.total_blocks = news["free_blocks"], news["total_blocks"]
        for request_id, event in news["events"]:
            await self._on_event(worker_id, request_id, event)

    async def _introduce(self, worker_id: str) -> None:
        """Sets up KV pairs at admission, off every request's path: a new decode worker with
        each prefill worker, a new prefill worker with each decode worker."""
        worker = self.workers[worker_id]
        ready = [(wid, w) for wid, w in self.workers.items() if w.ready]
        if worker.role == "decode" and worker.kv_address:
            for wid, other in ready:
                if other.role == "prefill":
                    await self._call_quietly(wid, "connect", [worker.kv_address])
        elif worker.role == "prefill":
            addresses = [w.kv_address for _, w in ready if w.role == "decode" and w.kv_address]
            if addresses:
                await self._call_quietly(worker_id, "connect", addresses)

    async def _on_event(self, worker_id: str, request_id: str, event: str) -> None:
        """Worker news: 'sending' (token 1 out, KV on its way), 'shipped' (the KV landed),
        'finished' or 'failed' (the final chunk is sent)."""
        entry = self.requests.get(request_id)
        if entry is None:
            return
        if event == "sending" and entry.phase == "prefilling":
            entry.phase = "transferring"
            return
        if event == "shipped":
            entry.phase = "decoding"
            self.workers[worker_id].requests.discard(request_id)
            return
        if event not in ("finished", "failed"):
            return
        # Ended on this worker (its final chunk is out): free what others still hold.
        self._forget(request_id)
        await self._release_everywhere(entry, keep=worker_id)
        if event == "finished":
            self.num_finished += 1
        else:
            self.num_failed += 1

    async def _lose(self, worker_id: str, why: str) -> None:
        """Drops a worker: its requests continue elsewhere if they can, else end clearly."""
        worker = self.workers[worker_id]
        if worker.ready:
            log.warning("worker %s (%s) lost: %s", worker_id, worker.role, why)
        worker.ready = False
        lost = [self.requests[r] for r in worker.requests if r in self.requests]
        worker.requests.clear()
        survivors = await self._landed_on_decode(worker_id, lost)
        for entry in lost:
            if entry.request.request_id in survivors:
                entry.phase = "decoding"  # the decode worker holds all it needs
                continue
            self._forget(entry.request.request_id)
            await self._release_everywhere(entry, keep=worker_id)
            self.num_failed += 1
            self._send_final(entry, "error", WorkerLost(worker_id, entry.phase))

    async def _landed_on_decode(self, lost: str, entries: list[InFlight]) -> set[str]:
        """Requests of a lost prefill worker whose KV already landed on their decode worker
        (the 'shipped' news may have died with the prefill worker)."""
        by_decode: dict[str, list[str]] = {}
        for entry in entries:
            if entry.prefill == lost and entry.decode is not None:
                by_decode.setdefault(entry.decode, []).append(entry.request.request_id)
        survivors: set[str] = set()
        for decode, ids in by_decode.items():
            if self.workers[decode].ready:
                try:
                    survivors.update(await self._call(decode, "landed", ids))
                except WorkerGone:
                    pass
        return survivors

    # ---- introspection ------------------------------------------------------------------

    def health(self) -> dict:
        roles: dict[str, dict[str, int]] = {}
        for worker in self.workers.values():
            counts = roles.setdefault(worker.role, {"ready": 0, "known": 0})
            counts["known"] += 1
            counts["ready"] += int(worker.ready)
        return {"workers": roles, "in_flight": len(self.requests)}

    def worker_metrics(self) -> list[dict]:
        return [
            {"worker_id": wid, "role": w.role, "ready": w.ready, "incarnation": w.incarnation,
             **self._load(wid, w).__dict__}
            for wid, w in self.workers.items()
        ]
