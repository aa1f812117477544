"""A worker of tp_size x pp_size ranks: the driver rank's side of its group.

The worker actor (workers/actors/worker_actor.py) is rank 0, the driver: it runs the
scheduler, the sampler and its own shard of the model. `RankGroup` starts the other ranks as
`RankActor`s (workers/actors/rank_actor.py) in the worker's placement group (a stage's TP
ranks share one bundle, so one node), joins them in one torch.distributed group
(gloo on CPU; gloo for the CPU step broadcast and NCCL for CUDA tensors on GPU) and hands each
step's inputs to them with one broadcast (`StepBroadcast`).

A group lives and dies whole: the driver owns the other ranks (Ray kills them when it dies),
and a watcher thread takes the driver's process down as soon as any other rank's loop ends,
so Ray restarts the whole group (max_restarts) and the router admits it again. Never a
half-alive group whose collectives hang.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, TCPStore

from workers.actors.step_broadcast import StepBroadcast
from workers.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.model_runner import ModelRunner, resolve_device
from workers.engine.role_engines import build_engine
from workers.engine.stage_driver import StageDriver
from workers.model.parallel import ParallelContext

log = logging.getLogger(__name__)

GROUP_TIMEOUT = datetime.timedelta(days=365)
"""Per-operation timeout of the group's collectives. The other ranks wait in the step
broadcast for as long as the worker stays idle, so liveness is the watcher's job (a dead rank
ends its loop), not a collective's timeout."""
JOIN_TIMEOUT_S = 300.0
"""Longest wait for every rank to join the group (models load before they join)."""
RANK_CPUS = 0.01
"""CPU share each rank asks of its bundle on CPU-only clusters (a bundle needs some resource;
the ranks are busy in their own threads, so they must not hold whole CPU slots)."""


def rank_resources(cuda: bool) -> dict[str, float]:
    """Ray resources of one rank: its GPU, or a token CPU share on CPU-only clusters."""
    return {"num_gpus": 1, "num_cpus": 0} if cuda else {"num_gpus": 0, "num_cpus": RANK_CPUS}


@dataclass(frozen=True)
class Rendezvous:
    """Where the group's ranks meet: the driver hosts a TCPStore at host:port."""

    host: str
    port: int
    world_size: int
    backend: str


def group_backend(device: torch.device) -> str:
    """gloo alone on CPU; on GPU NCCL for CUDA tensors and gloo for the CPU step broadcast."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def join_group(config: EngineConfig, rendezvous: Rendezvous, rank: int,
               store: TCPStore | None = None) -> ParallelContext:
    """Joins this process to its worker's group as `rank` and returns its ParallelContext.
    Every rank creates every TP group in the same order (torch requires it) and takes part in
    the warm-up, which builds NCCL's communicators now rather than inside a step."""
    if store is None:
        store = TCPStore(rendezvous.host, rendezvous.port, rendezvous.world_size, False,
                         timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(rendezvous.backend, store=PrefixStore("kvrelay/ranks", store),
                            rank=rank, world_size=rendezvous.world_size, timeout=GROUP_TIMEOUT)
    tp, pp = config.tp_size, config.pp_size
    tp_groups = [None]
    if tp > 1 and pp > 1:
        tp_groups = [dist.new_group(list(range(s * tp, (s + 1) * tp)), timeout=GROUP_TIMEOUT)
                     for s in range(pp)]
    pp_rank, tp_rank = divmod(rank, tp)
    parallel = ParallelContext(tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank, pp_size=pp,
                               tp_group=tp_groups[pp_rank if len(tp_groups) > 1 else 0])
    _warm_up(parallel, device)
    return parallel


def _warm_up(parallel: ParallelContext, device: torch.device) -> None:
    """One all-reduce over the TP group and one exchange between neighbouring stages."""
    probe = torch.ones(1, device=device)
    parallel.tp_all_reduce(probe)
    if parallel.pp_size > 1:
        if not parallel.is_first_stage:
            parallel.recv_from_prev_stage(probe)
        if not parallel.is_last_stage:
            parallel.send_to_next_stage(probe)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _exit_process(reason: str) -> None:
    """A Ray actor's way out: Ray sees the driver die and restarts the whole group."""
    log.error("rank group lost a rank (%s): taking the whole worker down", reason)
    logging.shutdown()
    os._exit(1)


class RankGroup:
    """Driver side. `parallel` is rank 0's ParallelContext; `send(step)` (the runner's step
    channel) broadcasts a step to the other ranks; `close()` stops them. `on_lost(reason)`
    runs (in the watcher thread) when another rank's loop ends while the group is open; by
    default it ends this process."""

    def __init__(self, config: EngineConfig, placement_group=None,
                 on_lost: Callable[[str], None] = _exit_process):
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from workers.actors.rank_actor import RankActor

        self.config = config
        self.world_size = config.tp_size * config.pp_size
        device = resolve_device(config.device)
        host = ray.util.get_node_ip_address()
        store = TCPStore(host, 0, self.world_size, True,
                         timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S),
                         wait_for_workers=False)
        self._store = store
        rendezvous = Rendezvous(host, store.port, self.world_size, group_backend(device))
        group = placement_group or get_current_placement_group()
        actor_cls = ray.remote(RankActor)
        self.ranks = []
        for rank in range(1, self.world_size):
            options = rank_resources(device.type == "cuda")
            if group is not None:
                stage = rank // config.tp_size
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=stage)
            self.ranks.append(actor_cls.options(max_restarts=0, max_concurrency=2,
                                                enable_task_events=False, **options)
                              .remote(config, rank, rendezvous))
        self._loops = [actor.serve.remote() for actor in self.ranks]
        self._closing = threading.Event()
        self._on_lost = on_lost
        self._watcher = threading.Thread(target=self._watch, name="rank-group-watch",
                                         daemon=True)
        self._watcher.start()
        self.parallel = join_group(config, rendezvous, 0, store)
        self.channel = StepBroadcast()
        self._attached: list[bytes] = []

    def send(self, step) -> None:
        """The StageDriver's step channel: every other rank runs this step with the driver
        (after the side payload `attach`ed for it)."""
        side, self._attached = self._attached, []
        self.channel.send(step, side)

    def attach(self, side: list[bytes]) -> None:
        """Side payload (KV transfer commands) that goes with the next step (engine thread)."""
        self._attached += side

    def post(self, side: list[bytes]) -> None:
        """Side payload sent now, between steps (engine thread)."""
        self.channel.post(side)

    def broken(self, error: Exception) -> None:
        """The driver's step failed in a collective (a rank died, or its step raised): the
        group is out of step for good, so it goes whole, before any request is failed here
        (the router then migrates them, or ends them with WorkerLost)."""
        if not self._closing.is_set():
            self._on_lost(f"a step failed: {type(error).__name__}: {error}")

    def _watch(self) -> None:
        import ray

        ready, _ = ray.wait(self._loops, num_returns=1, timeout=None)
        if self._closing.is_set():
            return
        try:
            ray.get(ready[0])
            reason = "a rank's loop ended"
        except Exception as exc:  # the rank died: its actor error says how
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self._on_lost(reason)

    def rank_info(self) -> list[dict]:
        """Each other rank's `rank_facts` (rank 1 first)."""
        import ray

        return ray.get([actor.info.remote() for actor in self.ranks], timeout=10)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops the other ranks' loops and leaves the group. Idempotent. Close the driver's
        runner first (`ModelRunner.close`): NCCL calls captured in its CUDA graphs would keep
        the group's teardown waiting (pytorch#115388)."""
        import ray

        if self._closing.is_set():
            return
        self._closing.set()
        try:
            self.channel.stop()
            ray.get(self._loops, timeout=timeout_s)
        except Exception as exc:  # a rank already gone: kill what is left
            log.warning("rank group close: %s", exc)
        for actor in self.ranks:
            ray.kill(actor, no_restart=True)
        leave_group()


def rank_facts(rank: int, runner: ModelRunner) -> dict:
    """One rank's place in its group and its KV cache (metrics, logs, tests)."""
    parallel = runner.parallel
    return {"rank": rank, "pid": os.getpid(), "tp_rank": parallel.tp_rank,
            "pp_rank": parallel.pp_rank, "layers": list(runner.layer_range),
            "kv_heads": runner.num_local_kv_heads, "num_blocks": runner.num_blocks,
            "kv_bytes_per_block": runner.kv_bytes_per_block}


def shape_facts(engine: LLMEngine) -> dict:
    """A worker's shape and every rank's facts (rank 0 first), for `ready()`."""
    runner = engine.runner
    channel = engine.driver.channel
    group = channel if isinstance(channel, RankGroup) else None
    others = group.rank_info() if group is not None else []
    return {"tp": runner.parallel.tp_size, "pp": runner.parallel.pp_size,
            "ranks": [rank_facts(0, runner), *others]}


def make_engine(config: EngineConfig) -> LLMEngine:
    """The engine of a worker: one process when tp_size x pp_size is 1, else this process is
    the driver rank of a RankGroup (its StageDriver hands each step to the others)."""
    if config.tp_size * config.pp_size == 1:
        return build_engine(config)
    group = RankGroup(config)
    return build_engine(config, driver=StageDriver(ModelRunner(config, group.parallel), group))
