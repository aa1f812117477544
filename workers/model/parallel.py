"""`ParallelContext`: where this rank sits in tensor and pipeline parallelism.

Passed explicitly to the model and runner, never read from a global. With tp_size == 1 every
collective below returns its input unchanged, so CPU tests run the same code path as TP runs.
Process groups are created by whoever launches the ranks (workers/actors/rank_group.py:
torch.distributed, NCCL on GPU, gloo on CPU); this module only uses them.

Rank numbering inside one worker's group: `rank_of(pp_rank, tp_rank) = pp_rank * tp_size +
tp_rank`, so rank 0 (the driver, which runs the scheduler) is TP rank 0 of the first stage and
the ranks of one stage are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from workers.errors import InvalidParameter


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = field(default=None, compare=False, repr=False)
    """torch.distributed ProcessGroup of this rank's TP peers; None means the default group."""
    pp_group: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size or not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(
                f"bad parallel position tp {self.tp_rank}/{self.tp_size} "
                f"pp {self.pp_rank}/{self.pp_size}"
            )

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def rank(self) -> int:
        """This rank in its worker's group (0: the driver)."""
        return self.rank_of(self.pp_rank, self.tp_rank)

    def rank_of(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def shard(self, size: int) -> int:
        """This TP rank's share of a dimension of `size` (which TP must divide)."""
        if size % self.tp_size:
            raise InvalidParameter(
                "tp_size", f"dimension {size} is not divisible by tp_size {self.tp_size}"
            )
        return size // self.tp_size

    def kv_head_range(self, num_kv_heads: int) -> range:
        """The KV heads this TP rank holds: an even share; or, with fewer KV heads than TP
        ranks (GQA/MQA), the one head its query heads read, replicated on
        tp_size // num_kv_heads ranks."""
        if num_kv_heads >= self.tp_size:
            count = self.shard(num_kv_heads)
            return range(self.tp_rank * count, (self.tp_rank + 1) * count)
        if self.tp_size % num_kv_heads:
            raise InvalidParameter(
                "tp_size", f"{num_kv_heads} kv heads cannot be replicated evenly over "
                           f"tp_size {self.tp_size}")
        head = self.tp_rank * num_kv_heads // self.tp_size
        return range(head, head + 1)

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over TP ranks (after row-parallel layers); in place."""
        if self.tp_size == 1:
            return x
        dist.all_reduce(x, group=self.tp_group)
        return x

    def tp_all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the TP ranks' shards along the last dim (vocab-parallel logits)."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    # ---- pipeline: point to point between stages (same TP rank), and back to the driver ----

    def send_to_next_stage(self, x: torch.Tensor) -> None:
        """Hands this stage's output (hidden states) to the same TP rank of the next stage."""
        dist.send(x.contiguous(), self.rank_of(self.pp_rank + 1, self.tp_rank))

    def recv_from_prev_stage(self, like: torch.Tensor) -> torch.Tensor:
        """Receives the previous stage's output into `like` (shape and dtype known ahead)."""
        dist.recv(like, self.rank_of(self.pp_rank - 1, self.tp_rank))
        return like

    def send_to_driver(self, x: torch.Tensor) -> None:
        """Last stage, TP rank 0: the step's logits go to rank 0, which samples."""
        dist.send(x.contiguous(), 0)

    def recv_from_last_stage(self, like: torch.Tensor) -> torch.Tensor:
        dist.recv(like, self.rank_of(self.pp_size - 1, 0))
        return like


SINGLE = ParallelContext()
"""No parallelism: one rank, one stage."""


def layer_range_for_stage(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Contiguous [start, end) of the layers a pipeline stage owns; earlier stages get the
    remainder so the last stage (which also runs the LM head) is never the largest."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)
