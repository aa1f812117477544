"""The prefix-cache benchmark runs on CPU at tiny shapes: its table has both rows, and the KV
each 1P+1D request moves is every prompt block with caching off and only the uncached tail
with it on (no timing is asserted)."""

from __future__ import annotations

import json

from cluster.bench import bench_prefix_cache as bench


def test_bench_prefix_cache_runs_on_cpu_and_moves_only_uncached_blocks(tiny_model_dir,
                                                                       tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(json.loads((tiny_model_dir / "config.json").read_text())))
    argv = ["--dummy-config", str(config), "--device", "cpu", "--dtype", "float32",
            "--shared-len", "48", "--unique-len", "6", "--output-len", "3",
            "--num-requests", "3", "--block-size", "8"]
    args = bench.parse_args(argv)
    off, on = bench.disagg_run(args, caching=False), bench.disagg_run(args, caching=True)
    assert off["blocks"] == 7  # 54 prompt tokens in blocks of 8
    assert on["blocks"] == 1  # the 6 tokens after the 48 shared ones, held by decode
    table = bench.main(argv)
    assert table == capsys.readouterr().out.strip()
    rows = [line.split() for line in table.splitlines() if line.split()[:1] in (["off"],
                                                                                 ["on"])]
    assert [r[0] for r in rows] == ["off", "on"] and rows[1][3] == "48"
    assert "device:   cpu" in table and "KV moved per request" in table


def test_profile_prints_the_cached_ttfts_tables(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text((tiny_model_dir / "config.json").read_text())
    args = bench.parse_args(["--dummy-config", str(config), "--device", "cpu", "--dtype",
                             "float32", "--shared-len", "48", "--unique-len", "6",
                             "--output-len", "2", "--num-requests", "2", "--block-size", "8",
                             "--profile"])
    assert bench.engine_run(args, caching=True)["cached"] == 48
    out = capsys.readouterr().out
    assert "profile of 2 cached TTFTs, by host time:" in out and "aten::" in out
