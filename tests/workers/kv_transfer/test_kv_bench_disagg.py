"""cluster/bench/bench_disagg.py end to end on CPU: `kvrelay serve` 1P+1D and colocated x2 with the
tiny model, real HTTP load of token-id prompts, KV bytes and KV ready delay counted by the
gateway, gloo baseline beside them, and a one-rate goodput sweep."""

from __future__ import annotations

import math
import socket

import pytest

from cluster.bench import bench_disagg
from loadtest.report import load_run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_bench_disagg_cpu_measures_kv_only_when_disaggregated_and_sweeps_goodput(
        tiny_model_dir, tmp_path):
    cfg = bench_disagg._parse([
        "--model", str(tiny_model_dir), "--device", "cpu", "--tokens", "48",
        "--output-len", "4", "--requests", "1", "--rates", "20", "--load-requests", "2",
        "--load-input-len", "24:40", "--tpot-slo", "tpot_p90=2s", "--tpot-limits", "2000,0.001",
        "--port", str(_free_port()),
        "--output-dir", str(tmp_path)])
    layout, raw, results = bench_disagg.collect(cfg)
    row = results[bench_disagg.DISAGG].lengths[48]
    colocated = results[bench_disagg.COLOCATED].lengths[48]
    per_block = 2 * layout.num_layers * layout.block_size * layout.num_kv_heads * \
        layout.head_dim * 4
    # The 48-token prompt's three float32 blocks (or a fourth, reserved for token 2 onwards)
    # moved once, over the wire in measurable time.
    assert row["bytes"] % per_block == 0 and 3 <= row["bytes"] // per_block <= 4
    assert row["wire_s"] > 0 and row["prompt_tokens"] == 48 and row["ttft"] > 0
    # The KV ready delay comes after token 1: no part of TTFT, so no bound by it.
    assert math.isfinite(row["kv_ready"]) and row["kv_ready"] >= 0
    assert math.isfinite(row["tpot"])
    assert colocated["bytes"] == 0 and math.isnan(colocated["kv_ready"])
    assert raw[48] > 0
    for mode, result in results.items():
        (point,) = result.sweep.points
        assert point.load == 20 and point.summary.num_ok == 2, mode
        assert point.summary.attainment == 1.0 and point.summary.slos_held
        records = load_run(point.run_json).records
        assert all(r.prompt_tokens_source == "exact" and 24 <= r.prompt_tokens <= 40
                   for r in records)
        assert result.sweep.best_load == 20
    table = bench_disagg.format_table(cfg, layout, raw, results)
    assert "ready/TTFT" in table and "goodput D/C" in table
    assert "highest rate holding tpot_p90<=2000ms" in table
    # Per-request TPOT limits from the same runs: all within 2 s, none within 1 us.
    good = {mode: r.sweep.points[0].summary.goodput for mode, r in results.items()}
    within = {mode: bench_disagg._goodput_within(r.sweep.points[0], 2.0)
              for mode, r in results.items()}
    assert within == pytest.approx(good) and all(g > 0 for g in good.values())
    assert "<= 2000 ms" in table and "0.00 / 0.00 = -" in table
