"""kernels/bench/bench_prefix_attention.py at tiny fp32 shapes (Triton interpreter on CPU):
one table with device and date, every tile shape x split count and SDPA per layout, and every
output equal (fp32 tolerance) to the default tiles' one split and to SDPA's."""

from __future__ import annotations

from kernels.bench import bench_prefix_attention as bench


def test_bench_prefix_attention_prints_one_checked_table(capsys) -> None:
    assert bench.main(["--tiny", "--reps", "1", "--sweep-tiles"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# device: ") and " date: " in lines[0]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]]
            for line in lines if line.startswith("| 12 ")]
    layouts = {"eager (1 rows)", "graph (2 rows)"}
    assert {r[1] for r in rows} == layouts
    tile_shapes = 1 + len(bench.SWEEP_TILES["tiny"])
    assert len(rows) == len(layouts) * (tile_shapes * len(bench.SPLITS) + 1)
    assert len({r[2] for r in rows if r[3] != "SDPA"}) == tile_shapes
    for row in rows:
        assert float(row[4]) > 0
        if row[3] != "SDPA":
            assert float(row[7]) < 1e-5 and float(row[8]) < 1e-5, row
