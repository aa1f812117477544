"""`RankActor`: one non-driver rank of a TP/PP worker (see workers/actors/rank_group.py).

It joins its worker's group, builds its shard of the model and KV cache (at the same time as
the other ranks: CUDA-graph capture and cache sizing are collectives), then `serve()` runs
each step the driver broadcasts until the driver stops the group. It never talks to the
router: the driver is the worker's only face.
"""

from __future__ import annotations

import logging

from workers.actors.kv_endpoint import rank_follower
from workers.actors.rank_group import Rendezvous, join_group, leave_group, rank_facts
from workers.actors.step_broadcast import StepBroadcast
from workers.config import EngineConfig
from workers.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)


class RankActor:
    """`ray.remote(RankActor).remote(config, rank, rendezvous)`; rank >= 1."""

    def __init__(self, config: EngineConfig, rank: int, rendezvous: Rendezvous):
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        self.rank = rank
        self.parallel = join_group(config, rendezvous, rank)
        self.runner = ModelRunner(config, self.parallel)
        # Its end of KV transfer (prefill/decode workers), driven by the driver's commands
        # that ride in the step broadcast.
        self.kv = rank_follower(rank, self.runner)
        self.channel = StepBroadcast(on_side=self.kv.handle)
        self.steps = 0

    def serve(self) -> int:
        """Runs the driver's steps until it stops the group; returns the number of steps."""
        try:
            while (step := self.channel.recv()) is not None:
                self.runner.run_pipeline(step, self.kv.layer_hook)
                self.steps += 1
        finally:
            self.kv.close()
            self.runner.close()
            leave_group()
        return self.steps

    def info(self) -> dict:
        """This rank's `rank_facts`."""
        return rank_facts(self.rank, self.runner)
