"""`kvrelay serve --join`: another gateway, with its own Router, on a running cluster.

    kvrelay serve --model DIR --colocated 2 --redis-url redis://H:6379/0               # A
    kvrelay serve --model DIR --join --redis-url redis://H:6379/0 --port 8001          # B

A joined gateway starts no workers. On the same Ray (`--ray-address`, default 'auto') it finds
cluster `name`'s workers: those the routers heard from (heartbeats in Redis) and the Ray
actors named `<name>-<role>-<i>`; it starts a Router actor of its own over them
(`<name>-router-<port>`, owned by this process, so it ends with it) with the shared control
plane, and serves HTTP on its own port. Every router sees one truth through Redis: the
workers' heartbeats, each router's load per worker, the KV index. Stopping this gateway
stops its Router only; the workers belong to the gateway that started them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from typing import Any

import ray

from cluster.config import ClusterConfig
from cluster.control_plane.redis_plane import RedisControlPlane
from cluster.launcher import Cluster, connect_ray, start_router
from router.router import NAMESPACE, ROUTER_SUFFIX
from workers.errors import InvalidParameter, KvrelayError

log = logging.getLogger(__name__)

_WORKER_ID = r"(prefill|decode|colocated)-\d+"


class NoClusterToJoin(KvrelayError):
    """`--join` found no worker of the cluster on that Ray, in Redis or by actor name."""

    def __init__(self, name: str, ray_address: str, redis_url: str, why: str = ""):
        self.name = name
        super().__init__(
            f"no kvrelay cluster {name!r} to join on Ray at {ray_address!r} "
            f"(redis {redis_url}){': ' + why if why else ''}; start one first with "
            f"`kvrelay serve ... --redis-url {redis_url}`")


def check_join(config: ClusterConfig) -> None:
    """Refuses `--join` without the control plane it shares (before Ray starts)."""
    if config.join and config.redis_url is None:
        raise InvalidParameter("join", "--join needs --redis-url: gateways share their "
                               "routers' state (heartbeats, loads, KV index) through Redis")


def find_workers(config: ClusterConfig) -> dict[str, Any]:
    """worker_id -> actor of every live worker of cluster `config.name` on this Ray."""
    assert config.redis_url is not None
    prefix = f"{config.name}-"
    heard = RedisControlPlane(config.redis_url).workers()
    named = [name for name in ray.util.list_named_actors()
             if re.fullmatch(re.escape(prefix) + _WORKER_ID, name)]
    found = {}
    for name in sorted({prefix + wid for wid in heard} | set(named)):
        try:
            found[name[len(prefix):]] = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # heard of lately, gone now
            continue
    return found


def join(config: ClusterConfig) -> Cluster:
    """Finds the running cluster's workers and starts this gateway's Router over them;
    raises NoClusterToJoin."""
    check_join(config)
    address = config.ray_address or "auto"
    try:
        started = connect_ray(replace(config, ray_address=address))
    except ConnectionError as exc:
        raise NoClusterToJoin(config.name, address, config.redis_url, str(exc)) from None
    workers = find_workers(config)
    if not workers:
        raise NoClusterToJoin(config.name, address, config.redis_url,
                              f"no worker in Redis nor a Ray actor named {config.name}-*")
    answers = ray.get([actor.execute.remote("ready") for actor in workers.values()],
                      timeout=config.startup_timeout_s)
    infos = {info["worker_id"]: info for info in answers}
    roles = {wid: info["role"] for wid, info in infos.items()}
    log.info("joining cluster %r: %s", config.name,
             ", ".join(f"{wid} ({role})" for wid, role in roles.items()))
    router = start_router(config, workers, roles,
                          name=f"{config.name}-{ROUTER_SUFFIX}-{config.port}")
    return Cluster(config, router, workers, infos, started, joined=True)
