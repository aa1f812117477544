"""Arrival processes: rates and burstiness within statistical bounds (seeded), traces."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from loadtest.arrival import ArrivalConfig, interarrival_gaps, send_offsets
from loadtest.errors import BadFlag, BadInputFile
from loadtest.trace import load_trace

N = 20_000


def gaps(config: ArrivalConfig, seed: int = 0, n: int = N) -> np.ndarray:
    return np.fromiter(itertools.islice(interarrival_gaps(config, seed), n), float, n)


def test_poisson_gaps_have_the_rate_and_unit_coefficient_of_variation():
    g = gaps(ArrivalConfig("poisson", rate=8.0), seed=1)
    assert g.mean() == pytest.approx(1 / 8, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, abs=0.05)
    # counts per 1 s window of a Poisson process: variance / mean (dispersion) ~ 1
    counts = np.bincount(np.cumsum(g).astype(int))[:-1]
    assert counts.mean() == pytest.approx(8.0, rel=0.03)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_keeps_the_rate_and_burstiness_sets_the_spread(burstiness):
    g = gaps(ArrivalConfig("gamma", rate=5.0, burstiness=burstiness), seed=2)
    assert g.mean() == pytest.approx(0.2, rel=0.05)
    expected_cv = 1 / math.sqrt(burstiness)  # gamma with shape k: CV = 1/sqrt(k)
    assert g.std() / g.mean() == pytest.approx(expected_cv, rel=0.08)


def test_bursty_gamma_clumps_arrivals_more_than_poisson():
    def dispersion(burstiness: float) -> float:
        g = gaps(ArrivalConfig("gamma", rate=10.0, burstiness=burstiness), seed=3)
        counts = np.bincount(np.cumsum(g).astype(int))[:-1]
        return counts.var() / counts.mean()

    assert dispersion(0.25) > 2.5 > 1.4 > dispersion(1.0) > 0.6 > dispersion(4.0)


def test_constant_rate_and_infinite_rate_are_exact():
    assert list(itertools.islice(send_offsets(ArrivalConfig("constant", rate=4.0), 0), 4)) \
        == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert list(itertools.islice(send_offsets(ArrivalConfig("poisson"), 0), 5)) == [0.0] * 5


def test_offsets_are_reproducible_by_seed_and_differ_across_seeds():
    config = ArrivalConfig("gamma", rate=3.0, burstiness=0.5)
    first = list(itertools.islice(send_offsets(config, seed=7), 50))
    assert first == list(itertools.islice(send_offsets(config, seed=7), 50))
    assert first != list(itertools.islice(send_offsets(config, seed=8), 50))
    assert first[0] == 0.0 and all(b >= a for a, b in zip(first, first[1:], strict=False))


def test_bad_arrival_configs_name_the_flag():
    cases = [(dict(kind="poisson", rate=0.0), "--rate"),
             (dict(kind="gamma", rate=1.0, burstiness=0.0), "--burstiness"),
             (dict(kind="closed"), "--arrival"),
             (dict(kind="poisson", concurrency=0), "--concurrency"),
             (dict(kind="uniform"), "--arrival")]
    for kwargs, flag in cases:
        with pytest.raises(BadFlag) as info:
            ArrivalConfig(**kwargs)
        assert info.value.flag == flag


def test_trace_replay_from_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "trace.jsonl"
    jsonl.write_text('{"timestamp": 2000, "input_length": 30, "output_length": 4}\n\n'
                     '{"timestamp": 1000, "input_length": 10, "output_length": 2}\n'
                     '{"timestamp": 3500, "input_len": 50, "output_len": 6}\n')
    entries = load_trace(jsonl, time_unit="ms")
    assert [(e.timestamp, e.input_len, e.output_len) for e in entries] == \
        [(1.0, 10, 2), (2.0, 30, 4), (3.5, 50, 6)]
    times = [e.timestamp for e in entries]
    assert list(send_offsets(ArrivalConfig("trace"), 0, times)) == [0.0, 1.0, 2.5]
    fast = ArrivalConfig("trace", trace_speedup=2.0)
    assert list(send_offsets(fast, 0, times)) == [0.0, 0.5, 1.25]

    csv = tmp_path / "trace.csv"
    csv.write_text("timestamp,input_length,output_length\n0.5,8,3\n0.0,9,1\n")
    assert [(e.timestamp, e.input_len) for e in load_trace(csv)] == [(0.0, 9), (0.5, 8)]


def test_bad_trace_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1}\n'
                   '{"timestamp": 1, "input_length": 5}\n')
    with pytest.raises(BadInputFile) as info:
        load_trace(bad)
    assert info.value.line == 2 and "output_length" in info.value.reason
    bad.write_text("{not json\n")
    with pytest.raises(BadInputFile):
        load_trace(bad)
    with pytest.raises(BadInputFile):
        load_trace(tmp_path / "missing.jsonl")
