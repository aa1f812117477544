"""`kvrelay bench-engine` on CPU with the tiny model: the table, and the HF baseline beside it."""

from __future__ import annotations

import json
import re

from cluster import cli


def test_bench_dummy_weights_against_transformers_prints_one_table(
    tiny_model_dir, tmp_path, capsys
):
    config = tmp_path / "config.json"  # a config.json alone: no checkpoint, no tokenizer
    config.write_text(json.dumps(json.loads((tiny_model_dir / "config.json").read_text())))
    argv = ["bench-engine", "--dummy-config", str(config), "--hf-baseline", "--device", "cpu"]
    argv += ["--num-prompts", "3", "--input-len", "12", "--output-len", "5", "--num-blocks", "32"]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    for label in ("device:    cpu", "dummy weights", "dtype:     float32", "date:"):
        assert label in table
    assert "3 prompts x 12 input tokens -> 5 output tokens" in table
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[-2:]}
    assert set(rows) == {"kvrelay", "transformers"}
    seconds, out_tps, prompts_ps, total_tps, ratio, match = rows["kvrelay"]
    assert abs(float(out_tps) - 15 / float(seconds)) < 0.1 * float(out_tps) + 0.1
    assert float(total_tps) > float(out_tps) > 0 and float(prompts_ps) > 0
    assert re.fullmatch(r"\d+\.\d\dx", ratio)
    # Same weights, float32, greedy: the engine reproduces transformers exactly.
    assert match == "3/3" and rows["transformers"][4:] == ["1.00x", "3/3"]


def test_bench_checkpoint_without_baseline(tiny_model_dir, capsys):
    from workers.bench import bench_engine as bench

    argv = ["--model", str(tiny_model_dir), "--device", "cpu", "--num-prompts", "2"]
    assert bench.main(argv + ["--input-len", "6", "--output-len", "3", "--num-blocks", "16"]) == 0
    last = capsys.readouterr().out.splitlines()[-1].split()
    assert last[0] == "kvrelay" and last[-2:] == ["-", "-"]
