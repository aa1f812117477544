"""Metric math on synthetic timelines: percentiles, TPOT, goodput, attainment, errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from loadtest.compare import compare_rows, markdown_compare, ratio
from loadtest.errors import BadFlag
from loadtest.metrics import Distribution, Summary, summarize
from loadtest.record import RequestRecord
from loadtest.report import RunDocument, load_run, markdown_run, write_run
from loadtest.slo import SLO, meets_slos, parse_slo
from loadtest.sweep import SweepPoint, best_load, parse_loads


def timeline(index: int, ttft: float, itl: list[float], output_tokens: int | None = None,
             error: str | None = None, prompt_tokens: int = 10) -> RequestRecord:
    """A record as the client would build it from token arrival times."""
    e2e = ttft + sum(itl)
    return RequestRecord(index=index, start_time=0.1 * index, prompt_tokens=prompt_tokens,
                         prompt_tokens_source="usage",
                         output_tokens=len(itl) + 1 if output_tokens is None else output_tokens,
                         output_tokens_source="usage", max_tokens=len(itl) + 1, ttft=ttft,
                         itl=itl, e2e=e2e, error=error)


def test_distribution_matches_numpy_linear_percentiles():
    values = list(range(1, 101))
    dist = Distribution.of(values)
    assert dist.count == 100 and dist.mean == pytest.approx(50.5) and dist.max == 100
    assert dist.p50 == pytest.approx(50.5)
    assert dist.p90 == pytest.approx(90.1)
    assert dist.p95 == pytest.approx(95.05)
    assert dist.p99 == pytest.approx(99.01)
    rng = np.random.default_rng(3)
    sample = rng.lognormal(size=501)
    assert Distribution.of(sample).p99 == pytest.approx(np.percentile(sample, 99))


def test_distribution_of_nothing_is_empty_not_zero():
    dist = Distribution.of([])
    assert dist.count == 0 and dist.mean is None and dist.p99 is None


def test_tpot_is_decode_time_per_token_after_the_first():
    record = timeline(0, ttft=0.1, itl=[0.02] * 9)  # 10 tokens, decode 0.18 s
    assert record.e2e == pytest.approx(0.28)
    assert record.tpot == pytest.approx(0.02)
    # usage says 19 tokens in the same 9 chunks (servers may batch tokens in a chunk)
    batched = timeline(0, ttft=0.1, itl=[0.02] * 9, output_tokens=19)
    assert batched.tpot == pytest.approx(0.01)


def test_tpot_with_one_output_token_is_undefined_and_excluded():
    single = timeline(0, ttft=0.05, itl=[])
    assert single.output_tokens == 1 and single.tpot is None
    summary = summarize([single, timeline(1, ttft=0.1, itl=[0.03, 0.03])], duration_s=1.0)
    assert summary.tpot.count == 1 and summary.tpot.mean == pytest.approx(0.03)
    assert summary.ttft.count == 2
    # No decode phase: a TPOT SLO cannot be missed, a TTFT SLO still can.
    assert meets_slos(single, (SLO("tpot", 0.001),))
    assert not meets_slos(single, (SLO("ttft", 0.01),))


def test_failed_requests_count_as_errors_by_kind_and_never_enter_latencies():
    records = [
        timeline(0, 0.1, [0.01] * 4),
        timeline(1, 0.2, [0.01] * 4),
        timeline(2, 0.001, [0.001], error="broken_stream"),  # tokens, then the stream broke
        timeline(3, 0.0, [], output_tokens=0, error="http_503"),
        timeline(4, 0.0, [], output_tokens=0, error="http_503"),
        timeline(5, 9.0, [], output_tokens=0, error="timeout"),
    ]
    s = summarize(records, duration_s=2.0)
    assert (s.num_requests, s.num_ok, s.num_failed) == (6, 2, 4)
    assert s.errors == {"broken_stream": 1, "http_503": 2, "timeout": 1}
    assert s.ttft.count == 2 and s.ttft.p50 == pytest.approx(0.15)
    assert s.itl.count == 8 and s.itl.max == pytest.approx(0.01)
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_token_throughput == pytest.approx(10 / 2.0)
    assert s.input_token_throughput == pytest.approx(20 / 2.0)
    assert s.total_token_throughput == pytest.approx(30 / 2.0)
    # No SLO: goodput is the successful rate, attainment the success fraction.
    assert s.num_good == 2 and s.goodput == pytest.approx(1.0)
    assert s.attainment == pytest.approx(2 / 6)


def test_goodput_needs_every_slo_and_attainment_counts_failures_as_misses():
    records = [
        timeline(0, ttft=0.2, itl=[0.02] * 5),  # meets both
        timeline(1, ttft=0.6, itl=[0.02] * 5),  # TTFT too slow
        timeline(2, ttft=0.2, itl=[0.08] * 5),  # TPOT too slow
        timeline(3, ttft=0.45, itl=[0.045] * 5),  # both just under their limits: meets
        timeline(4, ttft=0.1, itl=[0.01], error="stream_error"),
    ]
    slos = (parse_slo("ttft=500ms"), parse_slo("tpot=50ms"))
    s = summarize(records, duration_s=4.0, slos=slos)
    assert s.num_good == 2
    assert s.goodput == pytest.approx(0.5)
    assert s.attainment == pytest.approx(0.4)
    assert s.slos == ["ttft<=500ms", "tpot<=50ms"]
    e2e_only = summarize(records, duration_s=4.0, slos=(parse_slo("e2e=0.5s"),))
    assert e2e_only.num_good == 1  # e2e: 0.3 s, 0.7 s, 0.6 s, 0.675 s; failed one never counts


def test_parse_slo_units_and_rejections():
    assert parse_slo("ttft=500ms") == SLO("ttft", 0.5)
    assert parse_slo("tpot=50") == SLO("tpot", 0.05)  # bare numbers are milliseconds
    assert parse_slo("e2e=2s") == SLO("e2e", 2.0)
    assert parse_slo("TTFT:800us").limit_s == pytest.approx(8e-4)
    assert parse_slo("tpot_p90=20ms") == SLO("tpot", 0.02, 90.0)
    assert parse_slo("ttft_p99.9<=1s") == SLO("ttft", 1.0, 99.9)
    assert str(parse_slo("tpot_p90=20ms")) == "tpot_p90<=20ms"
    assert parse_slo(str(SLO("e2e", 2.0, 50.0))) == SLO("e2e", 2.0, 50.0)  # str round-trips
    for bad in ("ttft", "latency=5ms", "ttft=-1ms", "ttft=0", "ttft=5h", "tpot_p0=20ms",
                "tpot_p101=20ms", "tpot_p=20ms", "tpot=1.2.3ms"):
        with pytest.raises(BadFlag) as info:
            parse_slo(bad)
        assert info.value.flag == "--slo" and info.value.value == bad


def test_a_percentile_slo_holds_when_that_share_of_requests_sent_meets_it():
    # Nine requests decode at 10 ms per token, one at 30 ms: p90 TPOT is within 20 ms, p95 not.
    records = [timeline(i, 0.1, [0.01] * 4) for i in range(9)] + [timeline(9, 0.1, [0.03] * 4)]
    p90, p95 = parse_slo("tpot_p90=20ms"), parse_slo("tpot_p95=20ms")
    held = summarize(records, 2.0, (p90,))
    assert held.slos_held and held.num_good == 9 and held.goodput == pytest.approx(4.5)
    assert not summarize(records, 2.0, (p95,)).slos_held
    # A failed request is a miss: with a second slow one, only 8 of 10 meet 20 ms.
    failed = records[:8] + [timeline(8, 0.1, [], 0, error="timeout"), records[9]]
    assert not summarize(failed, 2.0, (p90,)).slos_held
    assert summarize(failed, 2.0, (parse_slo("tpot_p80=20ms"),)).slos_held
    assert summarize(records, 2.0, (parse_slo("tpot=20ms"),)).slos_held  # per request only
    assert "a percentile SLO is missed" in markdown_run({}, summarize(records, 2.0, (p95,)))


def test_record_and_summary_survive_a_json_round_trip(tmp_path):
    records = [timeline(0, 0.1, [0.02, 0.03]), timeline(1, 0.0, [], 0, error="timeout")]
    summary = summarize(records, 1.5, (SLO("ttft", 0.2),))
    doc = RunDocument({"url": "http://x", "model": "m"}, summary, records)
    loaded = load_run(write_run(doc, tmp_path / "run.json"))
    assert loaded.records == records and loaded.summary == summary
    assert Summary.from_dict(summary.to_dict()) == summary
    table = markdown_run(doc.meta, summary)
    assert "| TTFT (ms) | 100.00 |" in table and "| 1/2 |" in table and "timeout=1" in table


def test_best_load_is_the_last_point_before_the_first_miss():
    def point(load: float, attainment: float) -> SweepPoint:
        return SweepPoint(load, dataclasses.replace(summarize([], 1.0), attainment=attainment), "")

    points = [point(1, 1.0), point(2, 0.95), point(4, 0.7), point(8, 0.92)]
    assert best_load(points, 0.9) == 2  # 8 passes by luck after 4 missed: not counted
    assert best_load(points, 0.5) == 8
    assert best_load([point(1, 0.2)], 0.9) is None
    missed_percentile = dataclasses.replace(points[1].summary, slos_held=False)
    assert best_load([points[0], SweepPoint(2, missed_percentile, ""), *points[2:]], 0.5) == 1
    assert parse_loads("4, 1,2,inf", "--rates") == [1, 2, 4, math.inf]
    with pytest.raises(BadFlag):
        parse_loads("1,x", "--rates")
    with pytest.raises(BadFlag):
        parse_loads("0,1", "--rates")


def test_compare_ratios_are_b_over_a():
    a = summarize([timeline(0, 0.2, [0.02] * 3)], 1.0)
    b = summarize([timeline(0, 0.1, [0.04] * 3)], 0.5)
    rows = {label: (va, vb, r) for label, va, vb, r in compare_rows(a, b)}
    assert rows["TTFT p50 (ms)"] == pytest.approx((200.0, 100.0, 0.5))
    assert rows["TPOT mean (ms)"] == pytest.approx((20.0, 40.0, 2.0))
    assert rows["request throughput (req/s)"] == pytest.approx((1.0, 2.0, 2.0))
    assert ratio(0.0, 1.0) is None and ratio(None, 1.0) is None
    docs = [RunDocument({"url": u}, s, []) for u, s in (("http://a", a), ("http://b", b))]
    table = markdown_compare(*docs, "colocated", "disaggregated")
    assert "| TTFT p50 (ms) | 200.00 | 100.00 | 0.500 |" in table
