"""The Router Ray actor (a thin async wrapper over RouterCore) and the gateway's Backend on it.

One named actor per cluster (`<cluster name>-router` in namespace `NAMESPACE`): the gateway calls
`submit` / `abort` on it, workers never do (their outputs go straight to the gateway over ZMQ).
`RayBackend` is what `router.gateway.create_app` talks to in a Ray deployment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import ray
from ray import exceptions as ray_errors

from router.control_plane import ControlPlane
from router.membership import Found
from router.router_core import RouterCore
from router.router_state import RouterConfig
from router.worker_handle import RayHandle, raise_typed
from workers.actors.remote_errors import RemoteError, to_wire
from workers.errors import InternalError, KvrelayError, RouterUnavailable
from workers.protocol import GenerateRequest

NAMESPACE = "kvrelay"
ROUTER_SUFFIX = "router"

log = logging.getLogger(__name__)


class Router:
    """Ray actor body: owns a RouterCore whose worker handles are Ray actors."""

    def __init__(self, config: RouterConfig, workers: Callable[[], list[tuple[str, str, Any]]],
                 control_plane: Callable[[], ControlPlane] | None = None,
                 find_workers: Callable[[], dict[str, tuple[str, Any]]] | None = None):
        """`workers`: returns the workers to start with, (id, role, actor), looked up when
        called (cluster/control_plane/discovery.py `named_workers`), so that no actor handle
        is a constructor argument (Ray would keep it in its object store, which a restart
        cannot count on). `control_plane`: makes the shared one (Redis,
        cluster/control_plane/); None: in memory. A factory, so a restarted actor reconnects
        and starts from what it holds. `find_workers`: the cluster's live workers, id ->
        (role, actor) (cluster/control_plane/discovery.py), rescanned so that workers coming
        or going later are admitted or leave (router/membership.py); None: `workers` are all
        there is."""
        # Workers on other nodes push their news to this node's own address.
        self.core = RouterCore(dataclasses.replace(
            config, news_host=ray.util.get_node_ip_address()),
            control_plane() if control_plane else None)
        for worker_id, role, actor in workers():
            self.core.add_worker(worker_id, role, RayHandle(actor))
        if find_workers is not None:
            self.core.membership.watch(functools.partial(_found, find_workers))

    async def start(self, timeout_s: float) -> dict:
        """Waits until every worker answered a poll, then starts the health monitor."""
        await self.core.wait_ready(timeout_s)
        self.core.start()
        return self.core.health()

    async def _running(self) -> None:
        """After Ray restarted this actor (same constructor arguments, fresh state), nobody
        calls `start`: the first call polls the workers and starts the monitor itself.
        Requests in flight at the crash finish on their workers but cannot be aborted."""
        if not self.core.started:
            self.core.start()
            await self.core.poll_all()

    async def add_worker(self, worker_id: str, role: str, actor: Any) -> None:
        self.core.add_worker(worker_id, role, RayHandle(actor))

    async def submit(self, request: GenerateRequest) -> None:
        await self._running()
        try:
            await self.core.submit(request)
        except KvrelayError as exc:
            raise RemoteError(to_wire(exc)) from None
        except Exception:
            log.exception("placing %s failed", request.request_id)
            raise RemoteError(to_wire(InternalError("router"))) from None

    async def resume(self, request: GenerateRequest) -> None:
        """A gateway's continuation of a request that migrates (router/migration.py)."""
        await self._running()
        try:
            await self.core.resume(request)
        except Exception:
            log.exception("resuming %s failed", request.request_id)
            raise RemoteError(to_wire(InternalError("router"))) from None

    async def abort(self, request_id: str, deadline_s: float | None = None) -> None:
        await self._running()
        await self.core.abort(request_id, deadline_s)

    async def health(self) -> dict:
        await self._running()
        return self.core.health()

    async def worker_metrics(self) -> list[dict]:
        return self.core.worker_metrics()

    async def stats(self) -> dict:
        core = self.core
        return {"in_flight": len(core.requests), "finished": core.num_finished,
                "failed": core.num_failed,
                "aborted_in_phase": dict(core.aborted_in_phase), **core.migration.stats()}


class RayBackend:
    """The gateway's Backend over the Router actor: typed errors come back as themselves."""

    def __init__(self, router: ray.actor.ActorHandle, model_name: str):
        self.router = router
        self.model_name = model_name

    async def submit(self, request: GenerateRequest) -> None:
        await _unwrap(self.router.submit.remote(request))

    async def resume(self, request: GenerateRequest) -> None:
        """A continuation the router asked for (a `Resume` on the output channel)."""
        await _unwrap(self.router.resume.remote(request))

    async def abort(self, request_id: str, deadline_s: float | None = None) -> None:
        """The client left (or, with `deadline_s`, the request's deadline passed)."""
        await _unwrap(self.router.abort.remote(request_id, deadline_s))

    def model_names(self) -> list[str]:
        return [self.model_name]

    async def health(self) -> dict:
        return await _unwrap(self.router.health.remote())

    async def worker_metrics(self) -> list[dict]:
        return await _unwrap(self.router.worker_metrics.remote())


async def _found(find_workers: Callable[[], dict[str, tuple[str, Any]]]) -> Found:
    """The cluster's live workers as Membership takes them: role, identity (the actor handle,
    which compares by actor id), handle. Ray's GCS calls block: off the actor's loop."""
    actors = await asyncio.to_thread(find_workers)
    return {wid: (role, actor, RayHandle(actor)) for wid, (role, actor) in actors.items()}


async def _unwrap(ref: ray.ObjectRef) -> Any:
    """The call's result; typed errors as themselves, Ray's as RouterUnavailable or
    InternalError (never Ray's text, which carries pids, addresses and actor ids)."""
    try:
        return await ref
    except ray_errors.RayTaskError as exc:
        raise_typed(exc, "router")
    except (ray_errors.RayActorError, ray_errors.ActorUnavailableError) as exc:
        log.warning("router call failed: %s", exc)
        raise RouterUnavailable(type(exc).__name__) from None
