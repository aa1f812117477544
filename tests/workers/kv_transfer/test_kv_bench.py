"""cluster/bench/bench_kv.py runs end to end on CPU (gloo and ZMQ between two real processes)."""

from __future__ import annotations

import os

import pytest

from cluster.bench import bench_kv


@pytest.mark.slow
def test_bench_kv_cpu_variant_measures_every_size_and_prints_the_table():
    cfg = bench_kv._parse(["--device", "cpu", "--tokens", "16,48", "--layers", "2",
                           "--iters", "1", "--warmup", "1"])
    pair, zmq, local = bench_kv.collect(cfg)
    assert pair["path"] == "gloo" and zmq["path"] == "zmq"
    assert pair["probe_gbps"] > 0 and zmq["probe_gbps"] > 0
    for tokens in (16, 48):
        assert pair["raw"][tokens] > 0 and pair["ours"][tokens] > 0 and zmq["ours"][tokens] > 0
        assert all(local[tokens][k] > 0 for k in ("pack", "unpack", "copy"))
    table = bench_kv.format_table(cfg, pair, zmq, local)
    rows = [line.split() for line in table.splitlines() if line.lstrip().startswith(("16 ",
                                                                                     "48 "))]
    # tokens x 2 layers x (K, V) x 8 kv heads x 128 x 2 bytes, in MiB
    assert [(row[0], float(row[1])) for row in rows] == \
        [(str(t), round(t * 2 * 2 * 8 * 128 * 2 / 2**20, 1)) for t in (16, 48)]


def test_request_bytes_match_llama3_8b_kv_per_token():
    cfg = bench_kv._parse(["--tokens", "1024,4096,16384"])
    # 32 layers x (K, V) x 8 kv heads x 128 x 2 bytes = 128 KiB per token.
    assert [cfg.num_bytes(t) for t in cfg.tokens] == [t * 128 * 1024 for t in cfg.tokens]


@pytest.mark.slow
def test_bench_kv_fp8_moves_half_the_bytes_and_times_the_bf16_baseline_in_one_run():
    cfg = bench_kv._parse(["--device", "cpu", "--tokens", "32", "--layers", "2", "--iters", "1",
                           "--warmup", "1", "--kv-cache-dtype", "fp8"])
    assert (cfg.layout.dtype, cfg.baseline_dtype) == ("float8_e4m3fn", "bfloat16")
    pair, zmq, local = bench_kv.collect(cfg)
    fp8, base, path = bench_kv.compare_baseline(cfg, pair, zmq)
    assert path == "gloo" and fp8 is pair and base["ours"][32] > 0
    table = bench_kv.format_dtype_table(cfg, fp8, base, path)
    (row,) = [line.split() for line in table.splitlines() if line.lstrip().startswith("32 ")]
    # 32 tokens x 2 layers x (K, V) x 8 kv heads x 128: 1 byte each (fp8), 2 (bf16), in MiB
    assert (float(row[1]), float(row[2])) == (round(32 * 2 * 2 * 8 * 128 / 2**20, 1),
                                              round(32 * 2 * 2 * 8 * 128 * 2 / 2**20, 1))
    assert float(row[6]) == pytest.approx(float(row[4]) / float(row[5]), abs=0.02)
    # Messages per transfer as counted on the wire: direct by default, K and V of each of
    # the 2 layers (one contiguous run), a quarter of the request each.
    assert (int(row[8]), int(row[10])) == (4, 4)
    assert (float(row[9]), float(row[11])) == pytest.approx(
        (float(row[1]) / 4, float(row[2]) / 4), abs=0.06)
    staged = bench_kv._parse(["--device", "cpu", "--tokens", "32", "--layers", "2", "--iters",
                              "1", "--warmup", "1", "--kv-cache-dtype", "fp8",
                              "--coalesce-below-mib", "32"])
    pair, zmq, _ = bench_kv.collect(staged)
    fp8, base, path = bench_kv.compare_baseline(staged, pair, zmq)
    table = bench_kv.format_dtype_table(staged, fp8, base, path)
    (row,) = [line.split() for line in table.splitlines() if line.lstrip().startswith("32 ")]
    assert (int(row[8]), int(row[10])) == (1, 1)  # staged: each request in one message


@pytest.mark.slow
def test_bench_kv_timeline_places_both_ends_events_between_send_and_landed():
    cfg = bench_kv._parse(["--device", "cpu", "--tokens", "16,32", "--layers", "2", "--iters",
                           "2", "--warmup", "1", "--timeline"])
    pair = bench_kv.run_pair(cfg, "torch", ("cpu", "cpu"), raw=False)
    for tokens in cfg.tokens:
        at = bench_kv.event_offsets(pair, tokens, cfg.warmup, cfg.iters)
        # send() on the sender; the announce, posts and StreamEnd on the receiver; DONE there
        # (orders that hold in every transfer, so in their medians too).
        assert 0 <= at["s.send"] <= at["s.queued"] <= at["s.on_wire"] <= at["s.posted"]
        assert at["s.send"] <= at["r.part"] <= at["r.posted"] <= at["landed"] <= at["s.ack"]
        assert at["r.landed"] <= at["landed"] and at["r.end"] <= at["landed"]
    table = bench_kv.format_timeline(cfg, pair, cfg.layout.dtype)
    assert [line.split()[0] for line in table.splitlines()[2:]][-1] == "s.ack"
    assert "KVRELAY_KV_TIMELINE" not in os.environ  # only the bench's children
