"""Speculative decoding's parts on their own: the n-gram lookup, exact rejection sampling
(statistically, on known distributions), greedy acceptance, and the start-up checks."""

from __future__ import annotations

import pytest
import torch

from workers.config import SpeculativeConfig
from workers.engine.block_pool import BlockPool
from workers.engine.sampler import Sampler, SamplingRow
from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence, SequenceStatus, SequenceTimes
from workers.errors import InvalidParameter
from workers.spec.decoder import SpecStats, SpeculativeDecoder, check_speculative_config
from workers.spec.ngram import NgramProposer, ngram_lookup
from workers.spec.proposer import DraftRun
from workers.spec.rejection import verify


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed counts against probabilities (bins with an expected count
    under 5 merged into one)."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         statistic / 2))


def test_ngram_lookup_proposes_what_followed_the_latest_longest_match():
    assert ngram_lookup([1, 2, 3, 4, 9, 1, 2, 3], 3, 1, 4) == [4, 9, 1]
    assert ngram_lookup([5, 1, 7, 1, 8, 1], 2, 1, 4) == [8, 1]  # latest match of [1]
    assert ngram_lookup([1, 2, 3, 4, 5], 3, 1, 4) == []  # nothing repeats
    assert ngram_lookup([4, 4], 3, 2, 4) == []  # too short for a 2-gram with a follower
    assert ngram_lookup([1, 2, 9, 2, 1, 2], 2, 1, 4) == [9, 2]  # [1, 2] beats [2]


def _rows(params: SamplingParams, n: int) -> list[SamplingRow]:
    return [SamplingRow(params=params, prompt_token_ids=[0], output_token_ids=[])
            for _ in range(n)]


@pytest.mark.parametrize("proposer", ["sampled", "deterministic"])
def test_rejection_sampling_emits_the_target_distribution(proposer):
    """k = 2 drafts per run, target rows p0, p1, p2 fixed; draft q far from p. The first
    emitted token must follow p0, and the second (when the first draft was accepted) p1,
    whatever q is: chi-square over 20000 runs with a fixed generator (deterministic)."""
    gen = torch.Generator().manual_seed(1234)
    vocab, runs_n = 8, 20000
    target_logits = torch.randn(3, vocab, generator=gen) * 1.5
    p = torch.softmax(target_logits, dim=-1)
    q = torch.softmax(torch.randn(2, vocab, generator=gen) * 1.5, dim=-1)
    if proposer == "sampled":
        drafts = torch.stack([torch.multinomial(q[i], runs_n, replacement=True, generator=gen)
                              for i in range(2)], dim=1)
        runs = [DraftRun(d.tolist(), q) for d in drafts]
    else:  # an n-gram-like proposer: a fixed guess per position, q one-hot
        runs = [DraftRun([int(p[0].argmax()), int(q[1].argmax())]) for _ in range(runs_n)]
    logits = target_logits.repeat(runs_n, 1)
    result = verify(Sampler(seed=7), logits, _rows(SamplingParams(temperature=1.0),
                                                   3 * runs_n), runs)
    first = torch.bincount(torch.tensor([t[0] for t in result.token_ids]), minlength=vocab)
    assert chi_square_p_value(first, p[0]) > 1e-3
    second = [t[1] for t, a in zip(result.token_ids, result.num_accepted, strict=True) if a >= 1]
    assert len(second) > 1000
    counts = torch.bincount(torch.tensor(second), minlength=vocab)
    assert chi_square_p_value(counts, p[1]) > 1e-3
    # The test has power: the draft's own distribution is rejected.
    assert chi_square_p_value(first, q[0]) < 1e-6 or proposer == "deterministic"


def test_greedy_verification_keeps_the_matching_prefix_plus_the_target_token():
    logits = torch.full((7, 5), -1.0)
    for row, best in enumerate([2, 3, 4, 1, 0, 2, 3]):
        logits[row, best] = 1.0
    # Rows 0-3 verify [2, 3, 0] (argmaxes 2, 3, 4, 1), rows 4-5 verify [1] (argmaxes 0, 2),
    # row 6 has no draft (argmax 3).
    runs = [DraftRun([2, 3, 0]), DraftRun([1]), DraftRun([])]
    result = verify(Sampler(), logits, _rows(SamplingParams(temperature=0), 7), runs)
    assert result.token_ids == [[2, 3, 4], [0], [3]]
    assert result.num_accepted == [2, 0, 0]


def test_spec_stats_rates():
    stats = SpecStats()
    stats.add(4, 3)
    stats.add(4, 1)
    out = stats.to_dict()
    assert out["spec_decode_acceptance_rate"] == 0.5
    assert out["spec_decode_mean_accepted_length"] == 3.0


@pytest.mark.parametrize(("config", "field"), [
    (SpeculativeConfig("ngram", 0), "num_speculative_tokens"),
    (SpeculativeConfig("ngram", 8), "num_speculative_tokens"),
    (SpeculativeConfig("draft", 4), "draft_model"),
    (SpeculativeConfig("medusa", 2), "draft_model"),
    (SpeculativeConfig("ngram", 2, ngram_min=3, ngram_max=2), "ngram_min"),
    (SpeculativeConfig("ngram", 2, medusa_tree="tree"), "medusa_tree"),
    (SpeculativeConfig("medusa", 2, "heads", medusa_tree="bush"), "medusa_tree"),
    (SpeculativeConfig("medusa", 4, "heads", medusa_tree="tree", medusa_tree_size=3),
     "medusa_tree_size"),
    (SpeculativeConfig("medusa", 2, "heads", medusa_tree="tree", medusa_tree_size=8),
     "medusa_tree_size"),
])
def test_bad_speculative_config_names_the_field(config, field):
    with pytest.raises(InvalidParameter) as err:
        check_speculative_config(config)
    assert err.value.field == field


def test_per_request_num_speculative_tokens_is_range_checked():
    assert SamplingParams(num_speculative_tokens=0).num_speculative_tokens == 0
    with pytest.raises(InvalidParameter) as err:
        SamplingParams(num_speculative_tokens=9)
    assert err.value.field == "num_speculative_tokens"


def test_openai_request_carries_num_speculative_tokens_and_checks_its_range():
    from router.openai_protocol import sampling_params
    from router.request_models import CompletionRequest

    ok = CompletionRequest(prompt="hi", max_tokens=4, num_speculative_tokens=2)
    assert sampling_params(ok, 3, 100).num_speculative_tokens == 2
    assert sampling_params(CompletionRequest(prompt="hi"), 3, 100).num_speculative_tokens \
        is None
    with pytest.raises(InvalidParameter) as err:
        sampling_params(CompletionRequest(prompt="hi", num_speculative_tokens=8), 3, 100)
    assert err.value.field == "num_speculative_tokens"


def _decode_seq(seq_id: str, tokens: list[int], pool) -> Sequence:
    """A running decode sequence whose context is `tokens` (the last one its output)."""
    seq = Sequence(seq_id, tokens[:-1], SamplingParams(max_tokens=32, temperature=0.0), 0,
                   SequenceTimes(arrival=0.0), output_token_ids=[tokens[-1]],
                   status=SequenceStatus.RUNNING)
    seq.num_computed_tokens = seq.num_tokens - 1
    seq.block_table = pool.allocate(-(-seq.num_tokens // pool.block_size))
    return seq


@pytest.mark.parametrize("matching", [False, True])
def test_graph_padding_only_where_the_step_has_drafts(matching):
    """With verify graphs (pad_to_k), a sequence without a match is padded to K only when
    another sequence of the step has drafts; a step with no drafts at all stays a plain decode
    step, and every slot taken for the lookahead is given back."""
    config = SpeculativeConfig(method="ngram", num_speculative_tokens=3)
    pool = BlockPool(num_blocks=16, block_size=4)
    decoder = SpeculativeDecoder(config, NgramProposer(1, 3), pool, max_model_len=64,
                                 pad_to_k=True)
    repeating = [5, 6, 7, 8, 5, 6, 7] if matching else [1, 2, 3, 4, 9, 10, 11]
    seqs = [_decode_seq("a", repeating, pool), _decode_seq("b", [20, 21, 22, 23, 24], pool)]
    tables = [list(s.block_table) for s in seqs]
    decoder.propose(seqs)
    if matching:
        assert seqs[0].spec_token_ids == [8, 5, 6]  # what followed the earlier "5 6 7"
        assert seqs[1].spec_token_ids == [24, 24, 24]  # padded: the step is graphed
    else:
        assert [s.spec_token_ids for s in seqs] == [[], []]
        assert [s.block_table for s in seqs] == tables
