"""/metrics for TP/PP workers: each worker's shape and each rank's KV cache.

Every rank of a worker holds the same block ids (the driver's pool) over its own slice of
(layers x kv heads), so a rank's KV in use is the worker's used blocks times that rank's
bytes per block. The ranks' facts come from the workers' `ready()` answers: the router's,
asked when it admits a worker (its `worker_metrics` carry them: a worker found after start-up
has them too), else those of launch (`Cluster.ranks`); the used blocks from the router's
latest poll, at each scrape.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge

_RANK_LABELS = ["worker", "rank", "tp_rank", "pp_rank"]


class RankGauges:
    """Set at each scrape by GatewayMetrics (cluster/metrics.py)."""

    def __init__(self, registry: CollectorRegistry, ranks: dict[str, list[dict]]):
        self.ranks = ranks
        self.tp = Gauge("kvrelay_worker_tp_size", "Tensor-parallel ranks of the worker",
                        ["worker"], registry=registry)
        self.pp = Gauge("kvrelay_worker_pp_size", "Pipeline stages of the worker", ["worker"],
                        registry=registry)
        self.kv_used = Gauge("kvrelay_rank_kv_used_bytes", "KV cache bytes in use on the rank",
                             _RANK_LABELS, registry=registry)
        self.kv_capacity = Gauge("kvrelay_rank_kv_capacity_bytes", "KV cache bytes of the rank",
                                 _RANK_LABELS, registry=registry)

    def set(self, worker_metrics: list[dict[str, Any]]) -> None:
        for gauge in (self.tp, self.pp, self.kv_used, self.kv_capacity):
            gauge.clear()
        for values in worker_metrics:
            worker_id = str(values.get("worker_id", "?"))
            ranks = values.get("ranks") or self.ranks.get(worker_id)
            if not ranks:
                continue
            self.tp.labels(worker=worker_id).set(1 + max(r["tp_rank"] for r in ranks))
            self.pp.labels(worker=worker_id).set(1 + max(r["pp_rank"] for r in ranks))
            used = values.get("total_blocks", 0) - values.get("free_blocks", 0)
            for rank in ranks:
                labels = {"worker": worker_id, "rank": str(rank["rank"]),
                          "tp_rank": str(rank["tp_rank"]), "pp_rank": str(rank["pp_rank"])}
                per_block = rank["kv_bytes_per_block"]
                self.kv_used.labels(**labels).set(max(used, 0) * per_block)
                self.kv_capacity.labels(**labels).set(rank["num_blocks"] * per_block)


def describe_ranks(worker_id: str, info: dict) -> list[str]:
    """Log lines of a worker's ranks: position, layers, kv heads, KV cache size."""
    lines = []
    for rank in info.get("ranks", []):
        start, end = rank["layers"]
        size = rank["num_blocks"] * rank["kv_bytes_per_block"]
        lines.append(f"worker {worker_id} rank {rank['rank']} (tp {rank['tp_rank']}, pp "
                     f"{rank['pp_rank']}): layers [{start}, {end}), {rank['kv_heads']} kv "
                     f"heads, KV {rank['num_blocks']} blocks = {size / 2**20:.1f} MiB")
    return lines
