"""Placing a cluster on Ray: worker actors (GPU or CPU), then the named Router actor.

Worker actors are `ray.remote(WorkerActor)` around the plain worker classes, with placement
options; Ray
restarts a dead one (`max_restarts`) and the router admits it again when it answers a poll.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from cluster.config import ClusterConfig
from cluster.control_plane.discovery import find_workers, named_workers, worker_actor_name
from cluster.control_plane.redis_keys import RedisKeys
from cluster.control_plane.redis_plane import RedisControlPlane
from cluster.rank_metrics import describe_ranks
from cluster.worker_groups import (
    PlacementUnavailable,
    driver_options,
    place_group,
    remove_groups,
)
from router.router import NAMESPACE, ROUTER_SUFFIX, Router
from workers.actors.worker_actor import WorkerActor
from workers.actors.worker_base import WorkerSpec
from workers.errors import HandshakeMismatch, InvalidParameter
from workers.kv_transfer.layout import KVLayout, plan_group_transfers
from workers.kv_transfer.rank_routes import RankShape

log = logging.getLogger(__name__)

# Calls in flight per worker actor: the router's poll must run while a reserve waits.
# Actor calls record no task events: the GCS keeps up to 100k of them, and the router's polls
# and per-request calls made it grow by ~1 MB every few seconds of serving.
_WORKER_CONCURRENCY = 16
_ROUTER_CONCURRENCY = 1000


@dataclass
class Cluster:
    """Handles of a running cluster, for serve and tests."""

    config: ClusterConfig
    router: Any
    workers: dict[str, Any]
    """worker_id -> actor handle."""
    infos: dict[str, dict]
    """worker_id -> its `ready()` answer (block counts, vocab, max_model_len)."""
    started_ray: bool
    groups: list[Any] = field(default_factory=list)
    """Placement groups of the TP/PP workers (removed with the cluster)."""
    joined: bool = False
    """A gateway that joined another's workers (cluster/join.py): it stops its Router only."""

    @property
    def ranks(self) -> dict[str, list[dict]]:
        """worker_id -> its ranks' facts (position, layers, KV cache), rank 0 first."""
        return {wid: info.get("ranks", []) for wid, info in self.infos.items()}

    @property
    def max_model_len(self) -> int:
        """The longest request every worker can hold."""
        return min(info["max_model_len"] for info in self.infos.values())

    def call(self, worker_id: str, method: str, *args: Any) -> Any:
        """Calls a worker's method and waits (tests, tools; the router calls asynchronously)."""
        return ray.get(self.workers[worker_id].execute.remote(method, *args))

    def kill_actors(self) -> None:
        for actor in [self.router, *([] if self.joined else self.workers.values())]:
            ray.kill(actor, no_restart=True)
        remove_groups(self.groups)

    def shutdown(self) -> None:
        """Kills this cluster's actors (and Ray, if this process started it)."""
        self.kill_actors()
        if self.started_ray:
            ray.shutdown()


def connect_ray(config: ClusterConfig, num_cpus: int | None = None) -> bool:
    """Joins `config.ray_address` or starts a local Ray; True if this call started it.

    A local Ray's processes (GCS, raylet) start with SIGTERM blocked, inherited from this
    thread, as Ray blocks SIGINT in them: a SIGTERM to this process's group then leaves them
    serving while the gateway drains (cluster/graceful.py stops them afterwards)."""
    if ray.is_initialized():
        return False
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        ray.init(address=config.ray_address, namespace=NAMESPACE, num_cpus=num_cpus,
                 include_dashboard=False, log_to_driver=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return True


def worker_options(config: ClusterConfig, name: str) -> dict[str, Any]:
    """Ray options of one worker actor: 1 GPU (or half of one with gpu_share) on CUDA."""
    num_gpus = 0.0
    if _use_cuda(config):
        num_gpus = 0.5 if config.gpu_share else 1.0
    return {
        "name": name,
        "namespace": NAMESPACE,
        "num_gpus": num_gpus,
        # Workers are busy in their own loop thread; CPU slots must not limit placement on a
        # small CI box, so they reserve none.
        "num_cpus": 0,
        "max_restarts": config.max_worker_restarts,
        "max_concurrency": _WORKER_CONCURRENCY,
        "enable_task_events": False,
    }


def _use_cuda(config: ClusterConfig) -> bool:
    device = config.engine.device
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def worker_spec(config: ClusterConfig, worker_id: str, role: str = "colocated") -> WorkerSpec:
    return WorkerSpec(worker_id=worker_id, engine=config.engine_for(role),
                      kv_transport=kv_transport(config), host=config.host,
                      kv_max_pairs=config.kv_max_pairs)


def kv_transport(config: ClusterConfig) -> str:
    """`auto` picks CUDA IPC when workers share GPUs (NCCL refuses two ranks on one device; a
    pair that turns out to be on another host or GPU falls back to ZMQ by itself), else
    torch.distributed (NCCL between GPUs, gloo on CPU)."""
    if config.kv_transport == "auto" and config.gpu_share and _use_cuda(config):
        return "cuda_ipc"
    return config.kv_transport


def start_workers(config: ClusterConfig, groups: list[Any] | None = None,
                  actors: dict[str, Any] | None = None,
                  ) -> tuple[dict[str, Any], dict[str, dict]]:
    """Creates every worker actor (into `actors`) and waits until each has loaded its engine.
    A worker of tp x pp > 1 ranks first gets its placement group (appended to `groups`); one
    that cannot be placed in time raises PlacementUnavailable."""
    groups = [] if groups is None else groups
    actors = {} if actors is None else actors
    check_shapes(config)
    actor_cls = ray.remote(WorkerActor)
    cuda = _use_cuda(config)
    for worker_id, role in config.worker_roles():
        options = worker_options(config, worker_actor_name(config.name, worker_id))
        tp, pp = config.shape(role)
        if tp * pp > 1:
            if config.gpu_share:
                raise InvalidParameter("gpu_share", "TP/PP workers take whole GPUs")
            groups.append(place_group(worker_id, tp, pp, cuda, config.placement_timeout_s))
            options.update(driver_options(groups[-1], cuda))
        spec = worker_spec(config, worker_id, role)
        actors[worker_id] = actor_cls.options(**options).remote(role, spec)
    infos = ray.get([a.execute.remote("ready") for a in actors.values()],
                    timeout=config.startup_timeout_s)
    for info, (_, role) in zip(infos, config.worker_roles(), strict=True):
        tp, pp = config.shape(role)
        log.info("worker %s ready: tp %d x pp %d, %d KV blocks of %d tokens",
                 info["worker_id"], tp, pp, info["total_blocks"], info["block_size"])
        for line in describe_ranks(info["worker_id"], info) if tp * pp > 1 else []:
            log.info("%s", line)
    return actors, {info["worker_id"]: info for info in infos}


def check_shapes(config: ClusterConfig) -> None:
    """Refuses, by flag name, the TP/PP shapes this version cannot serve."""
    for role in ("colocated",) if config.colocated else ("prefill", "decode"):
        tp, pp = config.shape(role)
        name = "" if role == "colocated" else f"{role}_"
        if tp < 1 or pp < 1:
            raise InvalidParameter(f"{name}tp", f"tp {tp} x pp {pp}: both must be >= 1")
    ranked = [math.prod(config.shape(role)) > 1 for role in ("prefill", "decode")]
    if not config.colocated and any(ranked) and \
            kv_transport(config) not in ("auto", "nccl", "gloo", "torch"):
        raise InvalidParameter("kv_transport", f"{kv_transport(config)}: KV transfer between "
                               "workers of several TP/PP ranks runs rank to rank over "
                               "torch.distributed (auto, nccl or gloo)")


def check_pairs(infos: dict[str, dict]) -> None:
    """Every prefill worker must be able to feed every decode worker, rank to rank whatever
    their TP/PP shapes: raises HandshakeMismatch naming the first field on which a pair
    differs (or 'kv slices' where the shapes cannot tile), before any request is taken (the
    pair's own handshake checks again whenever it (re)connects)."""
    groups = {role: [_rank_layouts(info) for info in infos.values() if info["role"] == role]
              for role in ("prefill", "decode")}
    for prefill in groups["prefill"]:
        for decode in groups["decode"]:
            plan_group_transfers(prefill, decode)


def _rank_layouts(info: dict) -> list[KVLayout]:
    """Every rank's KV slice of a worker, from its driver rank's layout and its shape."""
    return RankShape(info.get("tp", 1), info.get("pp", 1)).layouts(
        KVLayout.from_dict(info["kv_layout"]))


def control_plane_factory(config: ClusterConfig):
    """What the Router actor builds its control plane with (again after a restart): Redis,
    its keys under the cluster's name, or None (in memory). A router shares its loads once per
    poll: another's stays fresh for ten polls (at least 2 s)."""
    if config.redis_url is None:
        return None
    RedisKeys(config.name)  # a name Redis keys cannot carry fails here, not in the actor
    return functools.partial(RedisControlPlane, config.redis_url, config.name,
                             load_ttl_s=max(2.0, 10 * config.router.poll_interval_s))


def router_args(config: ClusterConfig, worker_ids: list[str],
                roles: dict[str, str] | None = None) -> tuple:
    """The Router actor's constructor arguments for workers `worker_ids` (of `roles`, default
    the config's): plain data and factories of module functions, no actor handle (see
    discovery.named_workers), so Ray passes them inline and a restart finds them."""
    roles = roles or dict(config.worker_roles())
    members = [(wid, roles[wid]) for wid in worker_ids]
    return (config.router, functools.partial(named_workers, config.name, members),
            control_plane_factory(config),
            functools.partial(find_workers, config.name) if config.redis_url else None)


def start_router(config: ClusterConfig, workers: dict[str, Any],
                 roles: dict[str, str] | None = None, name: str | None = None) -> Any:
    """Starts the named Router actor (`name`, default `<cluster>-router`) over `workers` (of
    `roles`, default the config's) and waits until it sees every worker ready. With a shared
    control plane (`redis_url`) it rescans the cluster's workers (router/membership.py)."""
    router = ray.remote(Router).options(
        name=name or f"{config.name}-{ROUTER_SUFFIX}", namespace=NAMESPACE, num_cpus=0,
        max_concurrency=_ROUTER_CONCURRENCY, max_restarts=-1, enable_task_events=False,
    ).remote(*router_args(config, list(workers), roles))
    health = ray.get(router.start.remote(config.startup_timeout_s),
                     timeout=config.startup_timeout_s + 10)
    log.info("router ready: %s", health)
    return router


def launch(config: ClusterConfig, num_cpus: int | None = None) -> Cluster:
    """Starts (or joins) Ray, the workers and the router; returns their handles."""
    started = connect_ray(config, num_cpus)
    groups: list[Any] = []
    workers: dict[str, Any] = {}
    try:
        workers, infos = start_workers(config, groups, workers)
        check_pairs(infos)
    except (HandshakeMismatch, PlacementUnavailable, InvalidParameter):
        for actor in workers.values():
            ray.kill(actor, no_restart=True)
        remove_groups(groups)
        raise
    router = start_router(config, workers)
    return Cluster(config, router, workers, infos, started, groups)
