"""Placement groups of TP/PP workers: one per worker, one bundle per pipeline stage.

A stage's bundle holds its tp_size GPUs (a bundle always sits on one node, so a stage's TP
ranks share a node and its NVLink); stages PACK onto as few nodes as fit but may span nodes.
On CPU-only clusters a bundle asks a token CPU share per rank. A group that Ray cannot place
within the timeout fails start-up with `PlacementUnavailable`, naming what it asked for and
what the cluster has, instead of waiting forever.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from workers.actors.rank_group import RANK_CPUS, rank_resources
from workers.errors import KvrelayError


class PlacementUnavailable(KvrelayError):
    """A worker's tp x pp devices could not be placed on the Ray cluster in time."""

    def __init__(self, worker_id: str, tp: int, pp: int, resource: str, timeout_s: float,
                 available: dict[str, float]):
        self.worker_id = worker_id
        have = available.get(resource, 0.0)
        super().__init__(
            f"worker {worker_id} needs tp {tp} x pp {pp} = {tp * pp} {resource} "
            f"({pp} bundle(s) of {tp}, a stage's on one node); not placed within "
            f"{timeout_s:g} s: the Ray cluster has {have:g} {resource} available")


def stage_bundles(tp: int, pp: int, cuda: bool) -> list[dict[str, float]]:
    """One bundle per pipeline stage, holding its TP ranks' devices."""
    return [{"GPU": float(tp)} if cuda else {"CPU": RANK_CPUS * tp} for _ in range(pp)]


def place_group(worker_id: str, tp: int, pp: int, cuda: bool, timeout_s: float) -> Any:
    """Creates and waits for a worker's placement group; raises PlacementUnavailable (and
    removes the group) when it is not placed within `timeout_s`."""
    group = placement_group(stage_bundles(tp, pp, cuda), strategy="PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        resource = "GPU" if cuda else "CPU"
        raise PlacementUnavailable(worker_id, tp, pp, resource, timeout_s,
                                   ray.available_resources()) from None
    return group


def driver_options(group: Any, cuda: bool) -> dict[str, Any]:
    """Ray options that put a group's driver rank (the worker actor) in stage 0's bundle."""
    return {
        **rank_resources(cuda),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0),
    }


def remove_groups(groups: list[Any]) -> None:
    for group in groups:
        try:
            remove_placement_group(group)
        except Exception:  # noqa: BLE001 - Ray already gone: nothing left to free
            pass
