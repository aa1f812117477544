"""Colocated workers of several ranks over real HTTP: tensor parallel 2, pipeline parallel 2
and TP 2 x PP 2 (each worker one placement group of rank actors joined over gloo) answer the
16 concurrent mixed-length requests with greedy text identical to transformers' in float32,
leave every KV block free, and /metrics shows the worker's shape and each rank's KV."""

from __future__ import annotations

import httpx
import pytest

from cluster.config import ClusterConfig
from router.router_state import RouterConfig
from tests.e2e.served_cluster import run_workload, served, wait_blocks_free
from workers.config import CacheConfig, EngineConfig

BLOCK = 8


pytestmark = pytest.mark.usefixtures("local_ray")


def colocated_config(model_dir, tp: int, pp: int, name: str, num_blocks: int) -> ClusterConfig:
    """One colocated worker of tp x pp ranks on the tiny model."""
    engine = EngineConfig(model=str(model_dir),
                          cache=CacheConfig(block_size=BLOCK, num_blocks=num_blocks))
    return ClusterConfig(engine=engine, model_name="tiny", name=name, num_colocated=1,
                         tp=tp, pp=pp, router=RouterConfig(block_size=BLOCK, poll_interval_s=0.1))


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_colocated_parallel_worker_greedy_matches_transformers(tp, pp, tiny_model_dir,
                                                               workload):
    config = colocated_config(tiny_model_dir, tp, pp, f"tp{tp}pp{pp}", num_blocks=96)
    with served(config) as (url, cluster):
        info = cluster.infos["colocated-0"]
        assert (info["tp"], info["pp"]) == (tp, pp)
        ranks = info["ranks"]
        assert [r["rank"] for r in ranks] == list(range(tp * pp))
        assert len({r["pid"] for r in ranks}) == tp * pp  # one process per rank
        assert sorted((r["pp_rank"], r["tp_rank"]) for r in ranks) == \
            [(s, t) for s in range(pp) for t in range(tp)]
        assert {r["num_blocks"] for r in ranks} == {info["total_blocks"]}
        run_workload(url, workload)
        wait_blocks_free(cluster)
        metrics = httpx.get(f"{url}/metrics").text
        assert f'kvrelay_worker_tp_size{{worker="colocated-0"}} {tp}.0' in metrics
        assert f'kvrelay_worker_pp_size{{worker="colocated-0"}} {pp}.0' in metrics
        for rank in ranks:
            labels = (f'pp_rank="{rank["pp_rank"]}",rank="{rank["rank"]}",'
                      f'tp_rank="{rank["tp_rank"]}",worker="colocated-0"')
            capacity = rank["num_blocks"] * rank["kv_bytes_per_block"]
            assert f"kvrelay_rank_kv_capacity_bytes{{{labels}}} {float(capacity)}" in metrics
            assert f"kvrelay_rank_kv_used_bytes{{{labels}}}" in metrics
