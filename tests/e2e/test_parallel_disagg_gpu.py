"""On CUDA, over real HTTP: prefill and decode workers of different TP/PP shapes, each rank on
its own GPU, KV moved rank to rank over NCCL pairs; greedy float32 output equals
transformers', every block free afterwards. Each shape is skipped where the machine has fewer
GPUs than its workers' ranks (P TP1 -> D TP2 needs 3; P TP2 -> D TP2 needs 4)."""

from __future__ import annotations

import pytest
import ray
import torch

from cluster.config import ClusterConfig
from router.router_state import RouterConfig
from tests.e2e.served_cluster import run_workload, served, wait_blocks_free
from workers.config import CacheConfig, EngineConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = {
    "p-tp1-to-d-tp2": ((1, 1), (2, 1)),
    "p-tp2-to-d-tp1": ((2, 1), (1, 1)),
    "p-pp2-to-d-pp1": ((1, 2), (1, 1)),
    "p-tp2-to-d-tp2": ((2, 1), (2, 1)),
    "p-tp1pp2-to-d-tp2pp1": ((1, 2), (2, 1)),
}


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(include_dashboard=False, namespace="kvrelay", ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.mark.parametrize(("prefill", "decode"), SHAPES.values(), ids=SHAPES.keys())
def test_prefill_and_decode_of_different_shapes_over_nccl(prefill, decode, tiny_model_dir,
                                                          workload):
    needed = prefill[0] * prefill[1] + decode[0] * decode[1]
    if torch.cuda.device_count() < needed:
        pytest.skip(f"needs {needed} GPUs")
    engine = EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cuda",
                          cache=CacheConfig(block_size=16, num_blocks=256))
    config = ClusterConfig(engine=engine, model_name="tiny", name=f"gpu-pd-{needed}",
                           prefill_tp=prefill[0], prefill_pp=prefill[1],
                           decode_tp=decode[0], decode_pp=decode[1],
                           router=RouterConfig(block_size=16))
    with served(config) as (url, cluster):
        run_workload(url, workload)
        wait_blocks_free(cluster)
        paths = cluster.call("prefill-0", "transfer_paths")
        assert paths and {p["path"] for p in paths.values()} == {"nccl"}
