"""workers/bench/bench_spec.py on CPU at tiny shapes: one table with device and date, every
method at every batch size, and the target as its own draft accepting everything."""

from __future__ import annotations

import json

from workers.bench import bench_spec


def test_bench_spec_prints_one_table_with_every_method(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "config.json"  # a config.json alone: dummy weights, no tokenizer
    config.write_text((tiny_model_dir / "config.json").read_text())
    argv = ["--dummy-config", str(config), "--device", "cpu", "--batch-sizes", "1,2",
            "--input-len", "16", "--output-len", "9", "--num-blocks", "64", "--block-size",
            "4", "--k", "3"]
    assert bench_spec.main(argv) == 0
    table = capsys.readouterr().out
    assert "device:    cpu" in table and "date:" in table and "K: 3" in table
    assert "verify 1+3 tokens" in table and "(eager; eager" in table
    assert "medusa tree 1+7 tokens (eager, tree mask)" in table
    assert "prefill of 16 tokens: draft-small" in table
    rows = [line.split() for line in table.splitlines() if line.split()[1:2]
            and line.split()[1] in ("baseline", "ngram", "self-draft", "draft-small")]
    assert sorted((int(r[0]), r[1]) for r in rows) == sorted(
        (b, m) for b in (1, 2) for m in ("baseline", "ngram", "self-draft", "draft-small"))
    for _batch, method, tpot, per_step, ratio in rows:
        # On a loaded machine O tokens may time no slower than 1 (TPOT 0, ratio '-').
        assert float(tpot) >= 0 and (ratio.endswith("x") or ratio == "-")
        if method == "self-draft":  # identical dummy weights: every draft accepted
            assert float(per_step) == 4.0
    assert json.loads(config.read_text())["vocab_size"] > 0
