"""RankGroup: the driver rank in this process, the other ranks as Ray actors joined over gloo.
Logits of TP 2, PP 2 and TP 2 x PP 2 equal the single-rank runner's; steps travel as one
broadcast each (encode/decode round trip); a rank that dies is reported at once."""

from __future__ import annotations

import dataclasses
import time

import pytest
import ray
import torch

from workers.actors.rank_group import RankGroup
from workers.actors.step_broadcast import decode_step, encode_step, payload_size
from workers.config import CacheConfig, EngineConfig
from workers.engine.model_runner import ModelRunner
from workers.engine.stage_driver import StageDriver


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, namespace="kvrelay", ignore_reinit_error=True)
    yield
    ray.shutdown()


def config_for(model_dir, tp: int = 1, pp: int = 1) -> EngineConfig:
    return EngineConfig(model=str(model_dir), device="cpu", tp_size=tp, pp_size=pp,
                        cache=CacheConfig(block_size=4, num_blocks=8))


def test_step_survives_the_broadcast_encoding(make_step):
    step = make_step([([5, 6, 7, 8, 9], 5, [2, 6]), ([1, 2, 3], 1, [4])], 4)
    header, payload = encode_step(step)
    assert payload.numel() == payload_size(header.tolist())
    back = decode_step(header.tolist(), payload)
    assert back.seq_ids == ["0", "1"]
    assert dataclasses.replace(back, seq_ids=step.seq_ids) == step


@pytest.mark.parametrize(("variant", "tp", "pp"),
                         [("qwen2", 2, 1), ("qwen2", 1, 2), ("qwen2", 2, 2), ("mqa", 2, 1)],
                         ids=["tp2", "pp2", "tp2xpp2", "mqa-tp2-replicated-kv-head"])
def test_group_logits_match_single_rank(variant, tp, pp, make_model_dir, make_step):
    """qwen2: q/k/v biases, so the row/column split of biases too; mqa: one kv head, held by
    both TP ranks (each rank's query heads read it)."""
    model_dir = make_model_dir(variant)
    prefill = make_step([([3, 99, 250, 17, 8, 300, 41, 77, 120], 9, [5, 1, 3])], 4, "all")
    decode = make_step([([3, 99, 250, 17, 8, 300, 41, 77, 120, 7], 1, [5, 1, 3])], 4)
    single = ModelRunner(config_for(model_dir))
    expected = [single.execute(prefill), single.execute(decode)]
    lost: list[str] = []
    config = config_for(model_dir, tp, pp)
    group = RankGroup(config, on_lost=lost.append)
    try:
        runner = ModelRunner(config, group.parallel)
        assert runner.layer_range == (0, 2 // pp)
        driver = StageDriver(runner, group)
        for step, want in zip([prefill, decode], expected, strict=True):
            torch.testing.assert_close(driver.execute(step), want, atol=1e-5, rtol=0)
        ranks = group.rank_info()
        assert [(r["pp_rank"], r["tp_rank"]) for r in ranks] == \
            [divmod(rank, tp) for rank in range(1, tp * pp)]
        layers = {tuple(r["layers"]) for r in ranks} | {runner.layer_range}
        assert layers == ({(0, 2)} if pp == 1 else {(0, 1), (1, 2)})
    finally:
        group.close()
    assert lost == []


def test_a_dead_rank_is_reported_at_once(tiny_model_dir):
    lost: list[str] = []
    config = config_for(tiny_model_dir, tp=2)
    group = RankGroup(config, on_lost=lost.append)
    try:
        ModelRunner(config, group.parallel)
        ray.kill(group.ranks[0], no_restart=True)
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost and "Actor" in lost[0], lost
    finally:
        group.close()  # with a rank gone: kills the rest, never hangs
