"""`python -m workers.bench.bench_quant` on CPU with the tiny config (the GPU benchmark's code
path at toy size): with --quantize-lm-head each quantized format is measured twice, its LM head
dense and quantized, in one table whose `lm head` column says which; the quantized head's
rows read fewer weight bytes."""

from __future__ import annotations

import ast

from workers.bench import bench_quant


def test_quantize_lm_head_adds_a_row_per_format_with_the_head_quantized(tiny_model_dir,
                                                                       capsys):
    argv = ["--config", str(tiny_model_dir / "config.json"), "--formats", "bf16,int8,gptq",
            "--batch", "1", "--input-len", "4", "--output-len", "3", "--group-size", "32",
            "--attention-backend", "torch", "--dtype", "float32", "--device", "cpu",
            "--num-blocks", "16", "--quantize-lm-head"]
    assert bench_quant.main(argv) == 0
    captured = capsys.readouterr()
    rows = [(line[:13].strip(), line[13:21].strip()) for line in captured.out.splitlines()
            if line.startswith(("unquantized", "W8A16", "W4A16"))]
    assert rows == [("unquantized", "dense"), ("W8A16 int8", "dense"), ("W8A16 int8", "quant"),
                    ("W4A16 gptq", "dense"), ("W4A16 gptq", "quant")]
    measured = dict(line.split(": ", 1) for line in captured.err.splitlines() if ": {" in line)
    size = {key: ast.literal_eval(value)["weight_bytes"] for key, value in measured.items()}
    assert size.keys() == {"bf16", "int8", "int8+head", "gptq", "gptq+head"}
    assert size["int8+head"] < size["int8"] < size["bf16"]
    assert size["gptq+head"] < size["gptq"] < size["bf16"]


def test_profile_prints_where_each_formats_decode_spends_its_time(tiny_model_dir, capsys):
    """--profile: one host-op table per format (a GPU-kernel table too on CUDA), naming the
    format's checkpoint, beside the timing table."""
    argv = ["--config", str(tiny_model_dir / "config.json"), "--formats", "bf16,int8",
            "--batch", "1", "--input-len", "4", "--output-len", "3", "--attention-backend",
            "torch", "--dtype", "float32", "--device", "cpu", "--num-blocks", "16", "--profile"]
    assert bench_quant.main(argv) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("profile of batch-1 decode")]
    assert len(headers) == 2 and "by host time" in headers[0]
    assert "(bf16.json, " in headers[0] and "(int8.json, " in headers[1]
    assert "aten::" in out and "W8A16 int8" in out
