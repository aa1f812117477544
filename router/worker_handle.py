"""How the router calls a worker: the same `await handle.call(method, *args)` for a Ray actor
and for a plain in-process object, so RouterCore runs in tests without Ray. `method` is a
`WorkerApi` method (workers/actors/worker_api.py); its name crosses to the worker object.

A worker that is dead, restarting or unreachable raises `WorkerGone`; a typed error the worker
raised on purpose (NoCapacity, PromptTooLong, ...) reaches the caller as itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import ray
from ray import exceptions as ray_errors

from workers.actors.remote_errors import RemoteError, from_wire
from workers.errors import InternalError

log = logging.getLogger(__name__)


class WorkerGone(Exception):
    """The worker did not answer: dead, restarting, or its process is gone."""

    def __init__(self, method: str, reason: str):
        self.method = method
        self.reason = reason
        super().__init__(f"worker did not answer {method}(): {reason}")


class WorkerHandle(Protocol):
    async def call(self, method: Callable[..., Any], *args: Any) -> Any:
        """Runs `method(*args)` on the worker and returns its result."""
        ...


class LocalHandle:
    """An in-process worker object; each call runs in a thread, as a Ray actor call would."""

    def __init__(self, worker: Any):
        self.worker = worker

    async def call(self, method: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.worker, method.__name__), *args)


_GONE = (ray_errors.RayActorError, ray_errors.ActorUnavailableError)


class RayHandle:
    """A worker Ray actor (workers/actors/worker_actor.py, placed by cluster/launcher.py)."""

    def __init__(self, actor: ray.actor.ActorHandle):
        self.actor = actor

    async def call(self, method: Callable[..., Any], *args: Any) -> Any:
        name = method.__name__
        try:
            return await self.actor.execute.remote(name, *args)
        except _GONE as exc:
            raise WorkerGone(name, type(exc).__name__) from exc
        except ray_errors.RayTaskError as exc:
            raise_typed(exc, f"worker call {name}()")


def raise_typed(exc: ray_errors.RayTaskError, where: str):
    """Re-raises a remote typed error as itself; anything else (its text carries pids,
    addresses and actor ids) is logged and raised as InternalError(`where`)."""
    if isinstance(exc.cause, RemoteError):
        raise from_wire(exc.cause.wire) from None
    log.error("%s failed: %s", where, exc)
    raise InternalError(where) from None
