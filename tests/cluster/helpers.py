"""Test-side parts shared by tests/cluster, tests/router and tests/e2e: a ZMQ PULL collector
standing in for the gateway's socket, the gateway's real output path over a Ray Router
(`GatewayStreams`, which also continues migrated requests), the gateway's Backend over an
in-process RouterCore (`CoreBackend`), and greedy references computed with transformers."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import defaultdict
from typing import Any

import ray
import torch
import zmq

from cluster.config import ClusterConfig
from cluster.launcher import launch
from router.output_receiver import OutputReceiver
from router.router import RayBackend
from router.router_core import RouterCore
from router.router_state import RouterConfig
from router.stream_resume import StreamResume
from workers.config import CacheConfig, EngineConfig
from workers.engine.sampling_params import SamplingParams
from workers.protocol import GenerateRequest, OutputChunk, Resume, decode


class ChunkCollector:
    """Binds a PULL socket and gathers every OutputChunk by request id (a real socket, as the
    gateway's). `wait_finished(ids)` blocks until each id got its finished chunk."""

    def __init__(self) -> None:
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.chunks: dict[str, list[OutputChunk]] = defaultdict(list)
        self.resumes: list[Resume] = []
        """The router's asks for a continuation, which this collector does not answer."""
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop:
            if self._sock.poll(50):
                chunk = decode(self._sock.recv())
                with self._cond:
                    if isinstance(chunk, Resume):
                        self.resumes.append(chunk)
                    else:
                        self.chunks[chunk.request_id].append(chunk)
                    self._cond.notify_all()

    def finished(self, rid: str) -> bool:
        return any(c.finished for c in self.chunks.get(rid, []))

    def wait_finished(self, ids: list[str], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not all(self.finished(r) for r in ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [r for r in ids if not self.finished(r)]
                    raise TimeoutError(f"no finished chunk for {missing} in {timeout_s} s")
                self._cond.wait(left)

    def wait_tokens(self, rid: str, count: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.tokens(rid)) < count and not self.finished(rid):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{rid}: fewer than {count} tokens in {timeout_s} s")
                self._cond.wait(left)

    def tokens(self, rid: str) -> list[int]:
        return [t for c in self.chunks.get(rid, []) for t in c.new_token_ids]

    def final(self, rid: str) -> OutputChunk:
        finals = [c for c in self.chunks[rid] if c.finished]
        summary = [(c.new_token_ids, c.finish_reason, c.error_type, c.worker_id)
                   for c in self.chunks[rid]]
        assert len(finals) == 1, f"{rid}: {len(finals)} finished chunks: {summary}"
        return finals[0]

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self._sock.close(linger=0)


class GatewayStreams:
    """What the gateway does with outputs, over a real Router actor, without HTTP: the real
    OutputReceiver (token order, duplicates dropped, `Resume`) in its own event loop thread,
    and per request a StreamResume that sends the continuation through a RayBackend. `chunks`
    holds what the client would get; `stalls` each migration's added latency."""

    def __init__(self, router) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.receiver = OutputReceiver()
        self._run(self.receiver.start())
        self.backend = RayBackend(router, "tiny")
        self.chunks: dict[str, list[OutputChunk]] = defaultdict(list)
        self.stalls: list[float] = []
        self._tasks: list[asyncio.Task] = []

    @property
    def address(self) -> str:
        return self.receiver.address

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def submit(self, requests: list[GenerateRequest]) -> None:
        """Registers and submits the requests concurrently, as concurrent clients would."""

        async def one(request: GenerateRequest) -> None:
            queue = self.receiver.register(request.request_id,
                                           StreamResume(self.backend, request, self))
            self._tasks.append(asyncio.create_task(self._pump(request.request_id, queue)))
            await self.backend.submit(request)

        async def all_of() -> None:
            await asyncio.gather(*(one(r) for r in requests))

        self._run(all_of())

    async def _pump(self, rid: str, queue: asyncio.Queue) -> None:
        while not (self.chunks[rid] and self.chunks[rid][-1].finished):
            self.chunks[rid].append(await queue.get())

    def migrated(self, added_s: float) -> None:  # StreamResume's metrics sink
        self.stalls.append(added_s)

    def tokens(self, rid: str) -> list[int]:
        return [t for c in list(self.chunks[rid]) for t in c.new_token_ids]

    def final(self, rid: str) -> OutputChunk:
        finals = [c for c in self.chunks[rid] if c.finished]
        assert len(finals) == 1 and self.chunks[rid][-1].finished, self.chunks[rid]
        return finals[0]

    def wait(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
            time.sleep(0.02)

    def wait_finished(self, ids: list[str], timeout_s: float = 60.0) -> None:
        def done() -> bool:
            return all(self.chunks[r] and self.chunks[r][-1].finished for r in ids)

        self.wait(done, timeout_s, f"final chunks of {len(ids)} requests")

    def close(self) -> None:
        for task in self._tasks:
            self.loop.call_soon_threadsafe(task.cancel)
        self._run(self.receiver.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


class CoreBackend:
    """Backend over a RouterCore in the server's own event loop: on first use it waits for
    the workers and starts the core's tasks (health checks, workers' news), which end with
    that loop when the server stops."""

    def __init__(self, core: RouterCore):
        self.core = core
        self._started = False

    async def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            if self.core.workers:
                await self.core.wait_ready(30)
                self.core.start()

    async def submit(self, request: GenerateRequest) -> None:
        await self._ensure_started()
        await self.core.submit(request)

    async def abort(self, request_id: str, deadline_s: float | None = None) -> None:
        await self._ensure_started()
        await self.core.abort(request_id, deadline_s)

    async def health(self) -> dict[str, Any]:
        await self._ensure_started()
        return self.core.health()

    async def worker_metrics(self) -> list[dict[str, Any]]:
        await self._ensure_started()
        await self.core.poll_all()
        return self.core.worker_metrics()


def all_blocks_free(cluster) -> bool:
    """Every worker answers with all its blocks free (a restarting one: not yet)."""
    infos = cluster.infos
    try:
        free = [cluster.call(w, "free_blocks") for w in cluster.workers]
    except ray.exceptions.RayActorError:
        return False
    return free == [infos[w]["total_blocks"] for w in cluster.workers]


def wait_until(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"{what} not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


def actor_pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)


def kill_and_wait_restarted(actor, timeout_s: float = 60) -> float:
    """Kills `actor` (Ray restarts it) and waits until a new process answers. ray.kill
    returns before the old process is gone, and a call sent meanwhile may still be answered
    by it, which a test of the restarted actor must not take for the restart."""
    killed = actor_pid(actor)
    ray.kill(actor, no_restart=False)

    def restarted() -> bool:
        try:
            return actor_pid(actor) != killed
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    return wait_until(restarted, timeout_s, "the actor restarted")


def wait_all_ready(cluster, timeout_s: float = 120) -> None:
    def ready() -> bool:
        health = ray.get(cluster.router.health.remote())["workers"]
        return all(c["ready"] == c["known"] for c in health.values())

    wait_until(ready, timeout_s, "every worker admitted")


def incarnation(cluster, worker_id: str) -> str:
    """The incarnation the router serves of `worker_id` now."""
    view = {m["worker_id"]: m for m in ray.get(cluster.router.worker_metrics.remote())}
    return view[worker_id]["incarnation"]


def wait_readmitted(cluster, worker_id: str, timeout_s: float = 120,
                    old: str | None = None) -> None:
    """Until the router serves a new incarnation of the restarted worker (newer than `old`,
    by default the one it started with)."""
    old = old or cluster.infos[worker_id]["incarnation"]

    def admitted() -> bool:
        view = {m["worker_id"]: m for m in ray.get(cluster.router.worker_metrics.remote())}
        return view[worker_id]["ready"] and view[worker_id]["incarnation"] != old

    wait_until(admitted, timeout_s, f"{worker_id} re-admitted")


def wait_pairs_ready(cluster, timeout_s: float = 60) -> None:
    """Until every prefill worker's KV pair with every decode worker is set up (a decode
    worker restarted by an earlier test gets new pairs in the background after its
    readmission; until they are up its requests wait in transfer, not in decode)."""
    prefill = [w for w in cluster.workers if w.startswith("prefill")]
    decode = [w for w in cluster.workers if w.startswith("decode")]

    def ready() -> bool:
        addresses = [cluster.call(d, "kv_address") for d in decode]
        for p in prefill:
            paths = cluster.call(p, "transfer_paths")
            if any(paths.get(a, {}).get("path") is None for a in addresses):
                return False
        return True

    wait_until(ready, timeout_s, "every prefill -> decode KV pair set up")


def request(rid: str, prompt: list[int], address: str, max_tokens: int = 6) -> GenerateRequest:
    """A greedy request (EOS ignored) whose chunks go to the collector at `address`."""
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerateRequest(rid, prompt, sampling, address, arrival_time=time.time())


def kill_rank_mid_stream(cluster, collector: ChunkCollector, ranks: list[dict],
                         rid: str = "doomed") -> tuple[OutputChunk, float]:
    """Starts a long request, SIGKILLs rank 1 of the worker whose `ranks` (its ready() facts)
    are given once the request streams, and waits (5 s at most) for its final chunk: (that
    chunk, seconds from the kill to the client being told)."""
    ray.get(cluster.router.submit.remote(request(rid, [7] * 12, collector.address, 2000)))
    collector.wait_tokens(rid, 3)
    killed_at = time.monotonic()
    os.kill(ranks[1]["pid"], signal.SIGKILL)
    collector.wait_finished([rid], timeout_s=5)
    return collector.final(rid), time.monotonic() - killed_at


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation by transformers (float32, no EOS stop: compare with ignore_eos)."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
        do_sample=False, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


def prompts(count: int, vocab: int, seed: int = 0, low: int = 3, high: int = 40) -> list[list[int]]:
    """Token-id prompts of mixed lengths in [low, high)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def tiny_ray_cluster(model_dir, name: str, *, num_decode: int, num_blocks: int, block: int,
                     max_worker_restarts: int, max_migrations: int,
                     resume_timeout_s: float = 10.0, **layout: int):
    """Yields a 2-prefill gloo cluster of the tiny model on a local Ray (2 CPUs) whose router
    polls every 0.1 s and drops a worker after 1 s of silence; shuts both down after. For
    module-scoped fixtures of the kill tests. `layout`: ClusterConfig fields that replace
    the pools (e.g. num_colocated=2, tp=2)."""
    ray.init(num_cpus=2, include_dashboard=False, namespace="kvrelay", ignore_reinit_error=True)
    engine = EngineConfig(model=str(model_dir),
                          cache=CacheConfig(block_size=block, num_blocks=num_blocks))
    config = ClusterConfig(engine=engine, model_name="tiny", name=name, num_prefill=2,
                           num_decode=num_decode, kv_transport="gloo",
                           max_worker_restarts=max_worker_restarts,
                           router=RouterConfig(block_size=block, poll_interval_s=0.1,
                                               poll_timeout_s=1.0, max_migrations=max_migrations,
                                               resume_timeout_s=resume_timeout_s), **layout)
    cluster = launch(config)
    yield cluster
    cluster.shutdown()
    ray.shutdown()
