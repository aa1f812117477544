"""The TP/PP benchmark runs end to end at tiny shapes on CPU (gloo) and prints its table:
TP=1 and TP=2 decode rows per batch with the all-reduce share, and the PP=2 large-batch rows
(micro-batches in flight, and the whole batch in turn) against one device."""

from __future__ import annotations

from workers.bench.bench_parallel import main


def test_parallel_bench_prints_one_table_at_tiny_shapes(capsys):
    assert main(["--tiny", "--steps", "2", "--batches", "1,4", "--pp-batch", "8",
                 "--context", "16"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("device cpu | model tiny") and "context 16" in lines[0]
    rows = [line.split() for line in lines if line.startswith(("decode", "large"))]
    assert [(r[0], r[1], r[2]) for r in rows[:4]] == [
        ("decode", "TP=1", "1"), ("decode", "TP=2", "1"), ("decode", "TP=1", "4"),
        ("decode", "TP=2", "4")]
    assert rows[1][-2].endswith("%") and rows[0][-2] == "-"
    assert rows[4][:2] == ["large", "batch,"]
    assert rows[5][2:4] == ["PP=2", "2"] and rows[6][2:4] == ["PP=2", "serial"]
    assert all(float(r[-4]) > 0 for r in rows)  # ms/step measured for every row
