"""kernels/bench/bench_prefix_attention.py at tiny fp32 shapes (Triton interpreter on CPU):
one table with device and date, every split count and SDPA per layout, and every split count's
output equal (fp32 tolerance) to one split's and to SDPA's."""

from __future__ import annotations

from kernels.bench import bench_prefix_attention as bench


def test_bench_prefix_attention_prints_one_checked_table(capsys) -> None:
    assert bench.main(["--tiny", "--reps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# device: ") and " date: " in lines[0]
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| 12 ")]
    layouts = {"eager (1 rows)", "graph (2 rows)"}
    assert {r[1].strip() for r in rows} == layouts
    assert len(rows) == len(layouts) * (len(bench.SPLITS) + 1)
    for row in rows:
        assert float(row[3]) > 0
        if row[2].strip() != "SDPA":
            assert float(row[6]) < 1e-5 and float(row[7]) < 1e-5, row
