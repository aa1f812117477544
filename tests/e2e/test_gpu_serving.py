"""On CUDA, over real HTTP: 1P+1D sharing one GPU over CUDA IPC and over ZMQ, and 1P+1D on
two GPUs over NCCL; greedy float32 output equals transformers'. Skipped without CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import ray
import torch

from cluster.config import ClusterConfig
from router.router_state import RouterConfig
from tests.e2e.served_cluster import run_workload, served, wait_blocks_free
from workers.config import CacheConfig, EngineConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(include_dashboard=False, namespace="kvrelay", ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def gpu_config(tiny_model_dir) -> ClusterConfig:
    engine = EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cuda",
                          cache=CacheConfig(block_size=16, num_blocks=256))
    return ClusterConfig(engine=engine, model_name="tiny", router=RouterConfig(block_size=16))


@pytest.mark.parametrize(("transport", "path"), [("auto", "cuda_ipc"), ("zmq", "zmq")])
def test_1p1d_sharing_one_gpu_matches_transformers(gpu_config, workload, transport, path):
    """Two processes on one GPU: `auto` picks CUDA IPC (NCCL cannot pair them); ZMQ is the
    fallback path. Both land the KV exactly."""
    config = dataclasses.replace(gpu_config, name=f"gpushare-{path}", gpu_share=True,
                                 kv_transport=transport)
    with served(config) as (url, cluster):
        run_workload(url, workload)
        wait_blocks_free(cluster)
        paths = cluster.call("prefill-0", "transfer_paths")
        assert [p["path"] for p in paths.values()] == [path]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_1p1d_on_two_gpus_over_nccl_matches_transformers(gpu_config, workload):
    with served(dataclasses.replace(gpu_config, name="gpunccl")) as (url, cluster):
        run_workload(url, workload)
        wait_blocks_free(cluster)
        paths = cluster.call("prefill-0", "transfer_paths")
        assert [p["path"] for p in paths.values()] == ["nccl"]
