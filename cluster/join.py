"""`kvrelay serve --join`: another gateway, with its own Router, on a running cluster.

    kvrelay serve --model DIR --colocated 2 --redis-url redis://H:6379/0               # A
    kvrelay serve --model DIR --join --redis-url redis://H:6379/0 --port 8001          # B

A joined gateway starts no workers. On the same Ray (`--ray-address`, default 'auto') it finds
cluster `name`'s workers (its named worker actors, cluster/control_plane/discovery.py) and
starts a Router actor of its own over those that answer (`<name>-router-<port>`, owned by
this process, so it ends with it) with the shared control plane, and serves HTTP on its own
port. Every router sees one truth through Redis: the workers' heartbeats, each router's load
per worker, the KV index. The set of workers stays one truth too: every Router of a cluster
with a shared control plane rescans the cluster's workers (router/membership.py, `watch`), so
a worker that comes later (a pool scaled up, a worker restarted under a new actor, one that
was down when B joined) is admitted, its KV pairs set up as at start, and a gone one leaves,
with no restart of any gateway. Stopping this gateway stops its Router only; the workers
belong to the gateway that started them.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import ray

from cluster.config import ClusterConfig
from cluster.control_plane.discovery import find_workers
from cluster.control_plane.redis_keys import RedisKeys
from cluster.launcher import Cluster, connect_ray, start_router
from router.router import ROUTER_SUFFIX
from workers.errors import InvalidParameter, KvrelayError

log = logging.getLogger(__name__)


class NoClusterToJoin(KvrelayError):
    """`--join` found no live worker of the cluster on that Ray."""

    def __init__(self, name: str, ray_address: str, redis_url: str, why: str = ""):
        self.name = name
        super().__init__(
            f"no kvrelay cluster {name!r} to join on Ray at {ray_address!r} "
            f"(redis {redis_url}){': ' + why if why else ''}; start one first with "
            f"`kvrelay serve ... --redis-url {redis_url}`")


def check_join(config: ClusterConfig) -> None:
    """Refuses, before Ray starts, `--join` without the control plane it shares and a cluster
    name its Redis keys cannot carry (cluster/control_plane/redis_keys.py)."""
    if config.join and config.redis_url is None:
        raise InvalidParameter("join", "--join needs --redis-url: gateways share their "
                               "routers' state (heartbeats, loads, KV index) through Redis")
    if config.redis_url is not None:
        RedisKeys(config.name)


def join(config: ClusterConfig) -> Cluster:
    """Finds the running cluster's workers and starts this gateway's Router over those that
    answer within the start-up timeout (the others join it when they answer); raises
    NoClusterToJoin."""
    check_join(config)
    address = config.ray_address or "auto"
    try:
        started = connect_ray(replace(config, ray_address=address))
    except ConnectionError as exc:
        raise NoClusterToJoin(config.name, address, config.redis_url, str(exc)) from None
    found = find_workers(config.name)
    if not found:
        raise NoClusterToJoin(config.name, address, config.redis_url,
                              f"no live Ray actor named {config.name}-<role>-<i>")
    asked = {wid: actor.execute.remote("ready") for wid, (_, actor) in found.items()}
    answered, _ = ray.wait(list(asked.values()), num_returns=len(asked),
                           timeout=config.startup_timeout_s)
    infos = {wid: ray.get(ref) for wid, ref in asked.items() if ref in answered}
    if not infos:
        raise NoClusterToJoin(config.name, address, config.redis_url,
                              f"none of its workers ({', '.join(found)}) answered")
    workers = {wid: found[wid][1] for wid in infos}
    roles = {wid: found[wid][0] for wid in infos}
    log.info("joining cluster %r: %s%s", config.name,
             ", ".join(f"{wid} ({role})" for wid, role in roles.items()),
             "".join(f"; {wid} did not answer yet" for wid in found if wid not in infos))
    router = start_router(config, workers, roles,
                          name=f"{config.name}-{ROUTER_SUFFIX}-{config.port}")
    return Cluster(config, router, workers, infos, started, joined=True)
