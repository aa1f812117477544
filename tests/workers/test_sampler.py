"""Sampler on crafted logits: greedy, masks, penalties, seeds, logprobs; SamplingParams."""

from __future__ import annotations

import math

import pytest
import torch

from workers.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_penalties,
    apply_top_k_top_p_min_p,
    sampling_probs,
)
from workers.engine.sampling_params import SamplingParams
from workers.errors import InvalidParameter


def row(prompt=(), output=(), seed=None, **params) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), gen)


def masked(logits, top_k=0, top_p=1.0, min_p=0.0) -> list[bool]:
    out = apply_top_k_top_p_min_p(
        torch.tensor([logits]),
        torch.tensor([top_k]),
        torch.tensor([top_p]),
        torch.tensor([min_p]),
    )
    return torch.isinf(out[0]).tolist()


def test_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 4.0]])
    out = Sampler()(logits, [row(temperature=0), row(temperature=0)])
    assert out.token_ids == [1, 0] and out.logprobs == [None, None]


def test_top_k_keeps_exactly_k_best():
    assert masked([1.0, 4.0, 3.0, 2.0], top_k=2) == [True, False, False, True]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [math.log(p) for p in probs]
    assert masked(logits, top_p=0.7) == [False, False, True, True]
    assert masked(logits, top_p=0.8001) == [False, False, False, True]
    assert masked(logits, top_p=0.1) == [False, True, True, True]  # the top token always stays


def test_min_p_drops_tokens_below_fraction_of_top():
    probs = [0.6, 0.25, 0.1, 0.05]
    logits = [math.log(p) for p in probs]
    assert masked(logits, min_p=0.2) == [False, False, True, True]  # cut at 0.12


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    apply_penalties(logits, [row(prompt=[0], output=[1], repetition_penalty=2.0)])
    assert logits.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_presence_and_frequency_penalties_use_output_counts_only():
    logits = torch.zeros(1, 4)
    r = row(prompt=[3, 3], output=[1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, [r])
    assert logits.tolist() == [[0.0, -1.0, -0.75, 0.0]]


def test_banned_tokens_are_never_drawn_per_row():
    logits = torch.tensor([[10.0, 9.0, 0.0], [10.0, 9.0, 0.0], [10.0, 9.0, 0.0]])
    rows = [row(temperature=0), row(temperature=0), row(temperature=0)]
    rows[0].banned_token_ids = (0,)
    rows[2].banned_token_ids = (0, 1)
    assert Sampler()(logits, rows).token_ids == [1, 0, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_queues_its_work_on_the_gpu_without_waiting_for_it():
    """Until the token ids' copy back, sampling only queues work: the host must not wait for
    the step's forward (whose logits these are). Each of these synchronized once: -inf written
    through tensor indices (the scalar's copy), index lists and per-row parameters copied from
    pageable memory, and bincount (it reads the largest id back)."""
    logits = torch.randn(3, 128256, device="cuda")
    rows = [row(temperature=0), row(prompt=[3, 9], output=[9, 4, 4], temperature=0,
                                  repetition_penalty=1.3, presence_penalty=0.5,
                                  frequency_penalty=0.25),
            row(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01)]
    rows[2].generator = torch.Generator(device="cuda").manual_seed(3)  # a seeded request's
    rows[0].banned_token_ids = (int(logits[0].argmax()),)
    rows[2].banned_token_ids = (5, 7)
    expected = Sampler.processed_logits(logits.cpu(), [row_on_cpu(r) for r in rows]).cuda()
    sampler = Sampler("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        processed = Sampler.processed_logits(logits, rows)
        probs = sampling_probs(processed[2:], [rows[2].params])
        noise = sampler.exponential_noise(probs.shape, rows[2:], probs.device)
        chosen = (probs / noise).argmax(dim=-1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(processed, expected)
    assert int(chosen) in torch.topk(processed[2], 50).indices.tolist()
    greedy = sampler(logits, rows).token_ids[:2]
    assert greedy == expected[:2].argmax(dim=-1).tolist()


def row_on_cpu(r: SamplingRow) -> SamplingRow:
    return SamplingRow(params=r.params, prompt_token_ids=r.prompt_token_ids,
                       output_token_ids=r.output_token_ids,
                       banned_token_ids=r.banned_token_ids)


def test_seeded_draws_do_not_depend_on_the_batch_mix():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    alone = [Sampler()(logits[2:3], [row(seed=7, temperature=1.0)]).token_ids[0] for _ in range(3)]
    mixed = Sampler(seed=123)(
        logits, [row(temperature=0.7), row(temperature=0), row(seed=7), row(seed=1)]
    ).token_ids[2]
    assert alone == [alone[0]] * 3 and mixed == alone[0]


def test_sampling_follows_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    rows = [row(seed=i, top_k=3) for i in range(4000)]
    counts = torch.bincount(torch.tensor(Sampler()(logits, rows).token_ids), minlength=4)
    freq = (counts / 4000).tolist()
    assert freq[3] == 0.0
    for got, want in zip(freq[:3], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95], strict=True):
        assert abs(got - want) < 0.03


def test_logprobs_report_chosen_token_and_top_n_of_raw_distribution():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = Sampler()(logits, [row(temperature=0, logprobs=2)]).logprobs[0]
    expected = torch.log_softmax(logits[0], -1)
    assert out["token_id"] == 1 and out["logprob"] == pytest.approx(float(expected[1]))
    assert [t for t, _ in out["top"]] == [1, 2]


def test_sampling_params_validate_and_name_the_field():
    for field, value in [
        ("max_tokens", 0),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("min_p", 1.5),
        ("top_k", -3),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3.0),
        ("logprobs", 99),
    ]:
        with pytest.raises(InvalidParameter) as err:
            SamplingParams(**{field: value})
        assert err.value.field == field


def test_sampling_params_round_trip_through_dict():
    params = SamplingParams(max_tokens=5, stop=["\n", "END"], stop_token_ids=[3], seed=9)
    wire = params.to_dict()
    assert wire["stop"] == ["\n", "END"]
    again = SamplingParams.from_dict({**wire, "future_field": 1})
    assert again == params and again.extra == {"future_field": 1}
