"""Which workers cluster `name` has on this Ray now: its live named worker actors.

Workers are Ray actors named `<name>-<role>-<i>` in namespace `kvrelay` (cluster/launcher.py);
Ray's GCS is the one registry of which exist: a worker that no router has polled yet (started
after a gateway joined, restarted under a new actor) is there and nowhere else, and a
worker whose actor is gone (killed for good, its restarts spent) leaves it. What Redis holds
of workers (their heartbeats, router/control_plane.py) is written by the routers that poll
them; a router reads it when it registers a worker, to start from the incarnation the others
last heard (router/membership.py).

`find_workers` is what `kvrelay serve --join` starts from (cluster/join.py) and what every
Router of a cluster with a shared control plane rescans with (router/membership.py, `watch`).
`named_workers` is how a Router, started or restarted by Ray, gets its workers' handles.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import ray

from router.router import NAMESPACE

log = logging.getLogger(__name__)

_WORKER_ID = re.compile(r"(prefill|decode|colocated)-\d+")


def worker_actor_name(name: str, worker_id: str) -> str:
    """The Ray actor name of cluster `name`'s worker `worker_id` (in namespace NAMESPACE)."""
    return f"{name}-{worker_id}"


def find_workers(name: str) -> dict[str, tuple[str, Any]]:
    """worker_id -> (role, actor handle) of every live worker of cluster `name` on this Ray
    (the caller is connected to it)."""
    prefix = f"{name}-"
    found: dict[str, tuple[str, Any]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        actor_name = entry["name"]
        if entry["namespace"] != NAMESPACE or not actor_name.startswith(prefix):
            continue
        match = _WORKER_ID.fullmatch(actor_name[len(prefix):])
        if match is None:
            continue
        try:
            actor = ray.get_actor(actor_name, namespace=NAMESPACE)
        except ValueError:  # listed a moment ago, gone now
            continue
        found[match.group(0)] = (match.group(1), actor)
    return found


def named_workers(name: str, members: list[tuple[str, str]]) -> list[tuple[str, str, Any]]:
    """(worker id, role, actor handle) of cluster `name`'s workers `members` (id, role), looked
    up by their actor names; one whose actor is gone for good is left out (logged). The
    Router's constructor takes this, not the handles themselves: Ray keeps constructor
    arguments that hold actor handles in its object store, where the restart of an actor with
    max_restarts cannot count on finding them (ray-project/ray#53727; Ray logs it at every
    start)."""
    found = []
    for worker_id, role in members:
        try:
            found.append((worker_id, role, ray.get_actor(worker_actor_name(name, worker_id),
                                                         namespace=NAMESPACE)))
        except ValueError:
            log.warning("worker %s of cluster %r has no live actor: left out", worker_id, name)
    return found
