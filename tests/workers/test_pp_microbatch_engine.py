"""The engine of a PP=2 (and TP 2 x PP 2) worker keeps two micro-batches in flight (a
RankGroup over gloo, the other ranks as Ray actors): 16 mixed-length requests with chunked
prefill and preemption give transformers' greedy tokens; aborting sequences while their
micro-batch is in flight ends them, leaves the others exact, and frees their blocks once the
batch is back (every block free at the end)."""

from __future__ import annotations

import pytest

from tests.cluster.helpers import prompts
from workers.actors.rank_group import RankGroup
from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.engine.engine import LLMEngine
from workers.engine.model_runner import ModelRunner
from workers.engine.sampling_params import SamplingParams
from workers.engine.stage_driver import StageDriver

NUM_REQUESTS = 16


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture
def group_engine(tiny_model_dir):
    """make(tp, pp, num_blocks) -> an LLMEngine on the driver rank of a RankGroup."""
    groups = []

    def make(tp: int, pp: int, num_blocks: int) -> LLMEngine:
        config = EngineConfig(
            model=str(tiny_model_dir), device="cpu", tp_size=tp, pp_size=pp,
            cache=CacheConfig(block_size=4, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_seqs=NUM_REQUESTS, max_num_batched_tokens=40))
        group = RankGroup(config, on_lost=lambda reason: pytest.fail(reason))
        groups.append(group)
        return LLMEngine(config, driver=StageDriver(ModelRunner(config, group.parallel), group))

    yield make
    for group in groups:
        group.close()


def _requests() -> list[tuple[list[int], SamplingParams]]:
    batch = prompts(NUM_REQUESTS, 500, seed=5, low=2, high=48)
    return [(p, SamplingParams(max_tokens=1 + (i * 5) % 14, temperature=0, ignore_eos=True))
            for i, p in enumerate(batch)]


def _expected(hf_greedy, model_dir, requests) -> list[list[int]]:
    return [hf_greedy(model_dir, [p], params.max_tokens)[0] for p, params in requests]


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 2)], ids=["pp2", "tp2xpp2"])
def test_micro_batches_greedy_matches_transformers_with_chunks_and_preemption(
        tp, pp, group_engine, tiny_model_dir, hf_greedy):
    # 40 blocks of 4 tokens for 16 sequences of up to 61 tokens: preemption; prompts up to
    # 47 tokens against a 40-token budget: chunked prefill.
    engine = group_engine(tp, pp, num_blocks=40)
    requests = _requests()
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
    finals, collected, overlapped = {}, 0, 0
    while engine.has_unfinished():
        outputs = engine.step()
        finals.update({o.request_id: o.token_ids for o in outputs if o.finished})
        # Outputs with a batch still in flight: collected while the next one was submitted.
        collected += bool(outputs)
        overlapped += bool(outputs) and engine.driver.num_in_flight == 1
    assert overlapped > collected // 2, (overlapped, collected)
    assert engine.scheduler.num_preemptions > 0
    expected = _expected(hf_greedy, tiny_model_dir, requests)
    assert [finals[f"r{i}"] for i in range(NUM_REQUESTS)] == expected
    assert engine.num_free_blocks == engine.num_total_blocks


def test_aborts_in_flight_free_every_block_and_leave_the_rest_exact(
        group_engine, tiny_model_dir, hf_greedy):
    engine = group_engine(1, 2, num_blocks=256)
    requests = _requests()
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
    finals, aborted = {}, set()
    while engine.has_unfinished():
        outputs = engine.step()
        finals.update({o.request_id: o.token_ids for o in outputs if o.finished})
        assert not aborted & {o.request_id for o in outputs}
        in_flight = engine.micro.in_flight_ids
        if not aborted and in_flight and len(finals) >= 2:
            aborted = set(sorted(in_flight)[::2])  # decoding sequences, mid-stream
            free = engine.num_free_blocks
            for request_id in aborted:
                engine.abort(request_id)
            assert engine.num_free_blocks == free  # freed only once their batch is back
    assert aborted and not aborted & finals.keys()
    expected = _expected(hf_greedy, tiny_model_dir, requests)
    for i in range(NUM_REQUESTS):
        if f"r{i}" not in aborted:
            assert finals[f"r{i}"] == expected[i]
    assert engine.num_free_blocks == engine.num_total_blocks
