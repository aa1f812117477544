"""Graceful, bounded shutdown of `kvrelay serve` on SIGTERM or SIGINT.

The first signal (to the serve process or to its whole process group) stops admission: new
requests get 503 and /health says `shutting_down`, while the requests in flight go on for
up to `--drain-timeout` seconds; what is left then ends with an error event and [DONE] (a
503 for a client still waiting for a whole body) and is aborted on the workers, freeing its
KV (router/drain.py). A second signal cuts the drain short. Then uvicorn closes its
connections and `stop_cluster` stops the actors and the Ray this process started.

The whole-group case: Ray's own processes (GCS, raylet) are children of this process, in its
process group. `launcher.connect_ray` starts them with SIGTERM blocked (as Ray itself does
for SIGINT), so a SIGTERM to the group leaves them serving while the drain runs. At the end
they are SIGKILLed rather than asked (a blocked SIGTERM would cost Ray's one-second grace per
process), and this process leaves with `os._exit`: `ray.shutdown()` and Ray's exit hook wait
on the GCS (60 s when it is gone), which is why an exit used to take a minute.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from types import FrameType

import ray
import uvicorn

from cluster.launcher import Cluster
from router.drain import Drain

log = logging.getLogger(__name__)

STOP_CLUSTER_TIMEOUT_S = 5.0
"""Longest wait for the actors to be killed; the Ray this process started goes regardless."""


class GracefulServer(uvicorn.Server):
    """uvicorn whose SIGTERM/SIGINT drains the gateway before the server stops."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float):
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self.signals: list[int] = []
        self._shutting_down: asyncio.Task | None = None
        self._hurry: asyncio.Event | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: only note it; `on_tick` (every 0.1 s, in the loop) acts on it.
        # Not uvicorn's own handling, which stops listening at once and re-raises the signal
        # after the server stops (killing this process before it stops the cluster).
        self.signals.append(sig)

    async def on_tick(self, counter: int) -> bool:
        if self.signals and self._shutting_down is None:
            log.info("%s: shutting down", signal.Signals(self.signals[0]).name)
            self._hurry = asyncio.Event()
            self._shutting_down = asyncio.ensure_future(self._drain_then_exit())
        if len(self.signals) > 1 and self._hurry is not None:
            self._hurry.set()
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.shut_down(self.drain_timeout_s, self._hurry)
        finally:
            self.should_exit = True


def stop_cluster(cluster: Cluster, timeout_s: float = STOP_CLUSTER_TIMEOUT_S) -> None:
    """Kills the cluster's actors, then stops the Ray this process started (SIGKILL to its
    processes, see the module docstring) or disconnects from the one it joined. Bounded by
    `timeout_s` even when the GCS is gone (then the actors die with their raylet). The
    caller must leave with `os._exit` when `cluster.started_ray`."""
    killing = threading.Thread(target=cluster.kill_actors, daemon=True)
    killing.start()
    killing.join(timeout_s)
    if killing.is_alive():
        log.warning("actors not killed within %.0f s (is the GCS gone?)", timeout_s)
    if cluster.started_ray:
        for pid in _descendants(os.getpid()):
            _kill(pid)
    elif not killing.is_alive():
        ray.shutdown()


def _descendants(root: int) -> list[int]:
    """Every process below `root`: for serve, Ray's GCS, raylet, agents and workers (the
    agents outlive a killed raylet by seconds, so they are killed too, not waited for)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[-1].split()[1])
            except (OSError, ValueError, IndexError):  # the process ended while we looked
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
