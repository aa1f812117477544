"""Disaggregated prefill and decode workers of different TP/PP shapes over real HTTP: each
worker one placement group of rank actors joined over gloo, KV moved rank to rank over gloo
pairs (each prefill rank sends its slice's intersection with each decode rank's straight into
that rank's reserved blocks), greedy text identical to transformers' in float32 under
concurrent mixed-length requests (then again, their prefixes cached on both workers), every
KV block free on both workers afterwards, and /metrics showing each rank's KV cache of both
workers.

Shapes: P TP2 -> D TP1, P TP1 -> D TP2 (16 concurrent requests each), P PP2 -> D PP1,
P TP1/PP2 -> D TP2/PP1, and an MQA model (1 kv head) at P TP2 -> D TP2, where the head is
replicated on both ranks of each worker and goes once from prefill rank 0 to each decode rank.
"""

from __future__ import annotations

import httpx
import pytest

from cluster.config import ClusterConfig
from router.router_state import RouterConfig
from tests.cluster.helpers import hf_greedy, prompts
from tests.e2e.served_cluster import run_workload, served, wait_blocks_free
from workers.kv_transfer.layout import KVLayout
from workers.kv_transfer.rank_routes import RankShape, routes
from workers.text.tokenizer import Tokenizer

BLOCK = 8

pytestmark = pytest.mark.usefixtures("local_ray")

SHAPES = {
    "p-tp2-to-d-tp1": ("llama", (2, 1), (1, 1), 16),
    "p-tp1-to-d-tp2": ("llama", (1, 1), (2, 1), 16),
    "p-pp2-to-d-pp1": ("llama", (1, 2), (1, 1), 6),
    "p-tp1pp2-to-d-tp2pp1": ("llama", (1, 2), (2, 1), 6),
    "mqa-p-tp2-to-d-tp2": ("mqa", (2, 1), (2, 1), 6),
}


# Prompt 5 of this set, served alone (any worker layout, colocated single-rank too), ends its
# text without the leading U+FFFD that transformers' decode of the same tokens has: a
# detokenizer edge case of main, not a KV-transfer one. The 16-request runs keep it; the
# smaller ones leave it out so they fail only for what they test.
_DETOKENIZER_EDGE = 5


def _workload(model_dir, hf_reference, count: int):
    """`count` cases of the shared prompt set. The tiny MQA model's greedy choice is
    sometimes EOS, which hf_greedy bans (min_new_tokens) and ignore_eos serving does not: only
    prompts whose greedy continuation never picks EOS are kept, so both agree."""
    tokenizer = Tokenizer(model_dir)
    model = hf_reference(model_dir)
    cases = []
    for i, prompt in enumerate(prompts(64, 500, seed=11, low=2, high=48)):
        if len(cases) == count or (count < 16 and i == _DETOKENIZER_EDGE):
            continue
        max_tokens = 1 + (i * 5) % 14
        tokens = hf_greedy(model, prompt, max_tokens)
        if tokens != _greedy_with_eos(model, prompt, max_tokens):
            continue
        cases.append((prompt, max_tokens, i % 2 == 0, tokenizer.decode(tokens)))
    assert len(cases) == count
    return cases


def _greedy_with_eos(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation where EOS may be chosen (and does not stop it)."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    out = model.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant,prefill,decode,count", SHAPES.values(), ids=SHAPES.keys())
def test_prefill_and_decode_of_different_shapes_match_transformers(
        variant, prefill, decode, count, make_model_dir, hf_reference):
    from workers.config import CacheConfig, EngineConfig

    model_dir = make_model_dir(variant)
    workload = _workload(model_dir, hf_reference, count)
    engine = EngineConfig(model=str(model_dir), cache=CacheConfig(block_size=BLOCK,
                                                                  num_blocks=96))
    config = ClusterConfig(
        engine=engine, model_name="tiny", name=f"pd-{variant}-{prefill}-{decode}".replace(
            " ", "").replace(",", "x").replace("(", "").replace(")", ""),
        num_prefill=1, num_decode=1, kv_transport="gloo",
        prefill_tp=prefill[0], prefill_pp=prefill[1], decode_tp=decode[0],
        decode_pp=decode[1],
        router=RouterConfig(block_size=BLOCK, poll_interval_s=0.1, capacity_wait_s=30.0))
    with served(config) as (url, cluster):
        for wid, shape in (("prefill-0", prefill), ("decode-0", decode)):
            info = cluster.infos[wid]
            assert (info["tp"], info["pp"]) == shape
            assert len({r["pid"] for r in info["ranks"]}) == shape[0] * shape[1]
        run_workload(url, workload)
        wait_blocks_free(cluster)
        # Again: the prompts' full blocks are now cached on both workers, so each prefill
        # rank sends only the blocks after the decode worker's cached prefix.
        run_workload(url, workload)
        wait_blocks_free(cluster)
        assert cluster.call("decode-0", "prefix_cache_stats")["hits"] > 0
        # The driver's own pairs go to exactly the decode ranks its slice feeds.
        decode_address = cluster.call("decode-0", "report", "tcp://127.0.0.1:1").kv_address
        layout = KVLayout.from_dict(cluster.infos["prefill-0"]["kv_layout"])
        expected = routes(layout, RankShape(*prefill), decode_address)[0]
        paths = cluster.call("prefill-0", "transfer_paths")
        assert sorted(paths) == sorted(expected)
        assert {p["path"] for p in paths.values()} == {"gloo"}
        metrics = httpx.get(f"{url}/metrics").text
        for wid in ("prefill-0", "decode-0"):
            for rank in cluster.infos[wid]["ranks"]:
                labels = (f'pp_rank="{rank["pp_rank"]}",rank="{rank["rank"]}",'
                          f'tp_rank="{rank["tp_rank"]}",worker="{wid}"')
                capacity = rank["num_blocks"] * rank["kv_bytes_per_block"]
                assert f"kvrelay_rank_kv_capacity_bytes{{{labels}}} {float(capacity)}" in \
                    metrics
