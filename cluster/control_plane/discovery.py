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
"""

from __future__ import annotations

import re
from typing import Any

import ray

from router.router import NAMESPACE

_WORKER_ID = re.compile(r"(prefill|decode|colocated)-\d+")


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
