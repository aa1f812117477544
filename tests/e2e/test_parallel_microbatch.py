"""Pipeline micro-batches over real HTTP: a colocated PP=2 and a TP 2 x PP 2 worker (rank
actors over gloo; the driver keeps two micro-batches in flight) answer the 16 concurrent
mixed-length requests with transformers' greedy text in float32 while other streams hang up
mid-stream; every KV block is free afterwards and the group still answers exactly."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.cluster.helpers import prompts
from tests.e2e.served_cluster import complete, run_workload, served, wait_blocks_free
from tests.e2e.test_http_serving import disconnect_after
from tests.e2e.test_parallel_serving import colocated_config

pytestmark = pytest.mark.usefixtures("local_ray")


async def _workload_with_hang_ups(url: str, workload) -> list:
    """The workload's results, while 8 long streams hang up after 2 to 9 events."""
    cut = prompts(8, 500, seed=21, low=5, high=40)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        results = asyncio.gather(*(complete(client, p, n, s) for p, n, s, _ in workload))
        hang_ups = asyncio.gather(*(disconnect_after(url, p, 2 + i, 30)
                                    for i, p in enumerate(cut)))
        done, _ = await asyncio.gather(results, hang_ups)
    return done


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 2)], ids=["pp2", "tp2xpp2"])
def test_micro_batches_over_http_exact_and_hang_ups_free_every_block(tp, pp, tiny_model_dir,
                                                                   workload):
    config = colocated_config(tiny_model_dir, tp, pp, f"mb-tp{tp}pp{pp}", num_blocks=128)
    with served(config) as (url, cluster):
        results = asyncio.run(_workload_with_hang_ups(url, workload))
        for (prompt, max_tokens, stream, expected), (text, tokens, reason) in zip(
                workload, results, strict=True):
            assert text == expected, f"prompt {prompt} stream={stream}"
            assert tokens == max_tokens and reason == "length"
        wait_blocks_free(cluster)
        run_workload(url, workload)  # the ranks are still in step after the aborts
        wait_blocks_free(cluster)
