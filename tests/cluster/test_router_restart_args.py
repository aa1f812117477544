"""The Router actor restarts with what its constructor was given: no actor handle among those
arguments (cluster/launcher.py `router_args`). Ray keeps constructor arguments that hold actor
handles in its object store, where an actor restarted under max_restarts cannot count on them
(ray-project/ray#53727; Ray's core worker logs it when the actor is created). The workers'
handles are looked up by name instead (discovery.named_workers), at each (re)start."""

from __future__ import annotations

import ray

from cluster.config import ClusterConfig
from cluster.launcher import router_args
from router.router import NAMESPACE, Router
from tests.cluster.helpers import kill_and_wait_restarted, wait_until
from workers.config import EngineConfig

WORKERS = {"prefill-0": "prefill", "decode-0": "decode"}


@ray.remote
class StandIn:
    """A named actor where a worker would be (the router's constructor only registers it)."""

    def ping(self) -> str:
        return "pong"


def _worker_ids(router) -> list[str]:
    return sorted(m["worker_id"] for m in ray.get(router.worker_metrics.remote(), timeout=30)
                  if m["worker_id"] != "router")


def _registered(actor_name: str) -> bool:
    try:
        ray.get_actor(actor_name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def test_router_args_hold_no_actor_handle_and_a_restart_finds_its_workers(local_ray, capfd):
    config = ClusterConfig(engine=EngineConfig(model="unused"), model_name="m",
                           name="restart-args")
    stand_ins = [StandIn.options(name=f"{config.name}-{wid}", namespace=NAMESPACE).remote()
                 for wid in WORKERS]
    assert ray.get([a.ping.remote() for a in stand_ins]) == ["pong", "pong"]
    capfd.readouterr()
    router = ray.remote(Router).options(
        name=f"{config.name}-router", namespace=NAMESPACE, num_cpus=0, max_restarts=-1,
    ).remote(*router_args(config, list(WORKERS), WORKERS))
    assert _worker_ids(router) == sorted(WORKERS)
    assert "constructor arguments in the object store" not in capfd.readouterr().err

    kill_and_wait_restarted(router)  # Ray restarts it with the same arguments
    assert _worker_ids(router) == sorted(WORKERS)

    # A worker whose actor is gone for good is left out at the next start, not fatal to it.
    ray.kill(stand_ins[0], no_restart=True)
    # ray.kill returns before Ray unregisters the actor's name; a restart racing it may still
    # find the actor (so "gone for good" is when the name no longer resolves).
    killed_name = f"{config.name}-{next(iter(WORKERS))}"
    wait_until(lambda: not _registered(killed_name), 30, f"{killed_name} unregistered")
    kill_and_wait_restarted(router)
    assert _worker_ids(router) == ["decode-0"]
    ray.kill(router, no_restart=True)
