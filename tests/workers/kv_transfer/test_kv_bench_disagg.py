"""cluster/bench_disagg.py end to end on CPU: `kvrelay serve` 1P+1D and colocated x2 with the
tiny model, real HTTP load, KV bytes counted by the gateway, gloo baseline beside them."""

from __future__ import annotations

import math
import socket

import pytest

from cluster import bench_disagg


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_bench_disagg_cpu_measures_transfer_only_when_disaggregated(tiny_model_dir):
    cfg = bench_disagg._parse([
        "--model", str(tiny_model_dir), "--device", "cpu", "--tokens", "48",
        "--output-len", "4", "--requests", "1", "--load-requests", "2", "--rate", "20",
        "--load-input-len", "32", "--tpot-slo", "tpot=2s", "--port", str(_free_port())])
    layout, raw, results = bench_disagg.collect(cfg)
    disagg, _ = results["disagg 1P+1D"]
    colocated, _ = results["colocated x2"]
    row = disagg[48]
    per_block = 2 * layout.num_layers * layout.block_size * layout.num_kv_heads * \
        layout.head_dim * 4
    # Whole float32 blocks of the prompt moved once, over the wire in measurable time.
    assert row["bytes"] > 0 and row["bytes"] % per_block == 0 and row["wire_s"] > 0
    assert row["ttft"] > 0 and 0 < row["share"] < 1
    assert colocated[48]["bytes"] == 0
    assert raw[48] > 0
    for _, summary in results.values():
        assert summary.num_ok == 2 and summary.attainment == 1.0
    table = bench_disagg.format_table(cfg, layout, raw, results)
    assert "disagg 1P+1D" in table and "goodput" in table
    assert math.isfinite(row["tpot"])
