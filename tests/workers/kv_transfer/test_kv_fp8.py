"""FP8 KV cache through KV transfer: fp8 blocks move as fp8 (half the bytes of bf16 on the wire,
counted by the transfer itself), bit-exact; a pair whose KV dtypes differ is refused at the
handshake naming both dtypes; and a 1P+1D pair of real workers (gloo, layer-wise streaming)
with `kv_cache_dtype="fp8"` generates exactly the colocated fp8 engine's greedy tokens.

The per-layer K/V scales an fp8 cache's values are read with (1.0, or the checkpoint's:
workers/model/kv_scales.py) ride in the layout each end sends at the handshake: a pair whose
scales differ on a shared layer is refused naming `kv_scales` and the first such layer.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from kv_peer_process import random_caches
from test_kv_network import Ends, refused_send
from test_kv_processes import PeerProcess, assert_landed

from tests.cluster.helpers import ChunkCollector, prompts
from tests.cluster.test_disaggregated_workers import (
    make_spec,
    request,
    run_requests,
    wait_all_free,
)
from workers.actors.decode_worker import DecodeWorker
from workers.actors.prefill_worker import PrefillWorker
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.errors import HandshakeMismatch
from workers.kv_transfer import (
    KVLayout,
    TransferConfig,
    TransferState,
    check_compatible,
    make_sender,
    plan_transfer,
    slice_for_rank,
)
from workers.kv_transfer.cuda_ipc import copy_blocks

FP8 = "float8_e4m3fn"
TRANSPORTS = ["torch", "zmq"]


@pytest.fixture
def ends(request):
    made = Ends(TransferConfig(transport=request.param, probe_bytes=1 << 16))
    yield made
    for end in reversed(made.closing):
        end.close()


def _move(transport: str, layout: KVLayout, src_ids, dst_ids, devices=("cpu", "cpu")) -> int:
    """Sends blocks src_ids -> dst_ids from a sender here (on devices[0]) to a receiver in its
    own process (on devices[1]), as in serving; checks they land bit-exact in the layout's
    dtype; returns the bytes the receiver counted."""
    config = TransferConfig(transport=transport, probe_bytes=1 << 16)
    peer = PeerProcess(layout, config, num_blocks=16, seed=2, device=devices[1])
    src = random_caches(layout, 16, seed=1, device=devices[0])
    sender = make_sender(layout, src, config)
    try:
        peer.call("expect", "r", dst_ids, 60)
        sender.send("r", peer.address, src_ids, dst_ids, {"first_token_id": 1})
        assert sender.wait("r", 60) is TransferState.DONE, sender.table.get("r").reason
        received = peer.call("record", "r", 10)
        assert received["state"] == TransferState.DONE.value, received["reason"]
        for dk, dv in assert_landed(peer, src, src_ids, dst_ids):
            assert dk.dtype == dv.dtype == getattr(torch, layout.dtype)
        return received["num_bytes"]
    finally:
        sender.close()
        peer.close()


def _fp8_and_bf16_bytes(transport: str, layout: KVLayout, devices=("cpu", "cpu")) -> None:
    src_ids, dst_ids = [3, 9, 4], [7, 0, 12]
    moved = {}
    for dtype in ("bfloat16", FP8):
        other = KVLayout(**{**layout.to_dict(), "dtype": dtype})
        moved[dtype] = _move(transport, other, src_ids, dst_ids, devices)
    per_block = 2 * layout.num_layers * layout.block_size * layout.num_kv_heads * layout.head_dim
    assert moved[FP8] == len(src_ids) * per_block  # one byte per element on the wire
    assert moved["bfloat16"] == 2 * moved[FP8]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fp8_blocks_move_as_fp8_with_half_the_bytes_of_bf16(transport, layout):
    """The flow of test_fp8_blocks_move_as_fp8_on_gpu on the CPU (gloo for torch)."""
    _fp8_and_bf16_bytes(transport, layout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fp8_blocks_move_as_fp8_on_gpu(transport):
    """NCCL between two GPUs (Triton kv_pack on both ends), ZMQ on one GPU; each end in its
    own process, as in serving (both ends of an NCCL pair built by one process crashed inside
    ProcessGroupNCCL: see test_kv_gpu's staged-messages test)."""
    if transport == "torch" and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    devices = ("cuda:1", "cuda:0") if transport == "torch" else ("cuda:0",) * 2
    layout = KVLayout("gpu-fp8", "bfloat16", 16, num_layers=4, num_kv_heads=8, head_dim=128)
    with torch.cuda.device(devices[0]):
        _fp8_and_bf16_bytes(transport, layout, devices)


def test_cuda_ipc_block_copy_moves_fp8_blocks(layout):
    """The cuda_ipc path's device-to-device block copy (here on CPU tensors), whole and for a
    TP slice: torch has no float8 index_copy_, so fp8 blocks move as bytes."""
    fp8 = KVLayout(**{**layout.to_dict(), "dtype": FP8})
    for sender in (fp8, slice_for_rank(fp8, 1, 2)):
        src, dst = random_caches(sender, 8, seed=1), random_caches(fp8, 8, seed=2)
        plan = plan_transfer(sender, fp8)
        copy_blocks(src, sender, dst, fp8, plan, [1, 5], [6, 0])
        heads = plan.local_heads(fp8)
        for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
            for got, sent in ((dk[[6, 0]][:, :, heads], sk[[1, 5]]),
                              (dv[[6, 0]][:, :, heads], sv[[1, 5]])):
                assert torch.equal(got.view(torch.uint8), sent.view(torch.uint8))


@pytest.mark.parametrize("ends", TRANSPORTS, indirect=True)
def test_kv_dtype_mismatch_is_refused_naming_both_dtypes(ends, layout):
    fp8 = KVLayout(**{**layout.to_dict(), "dtype": FP8})
    reason, receiver = refused_send(ends, layout, fp8, random_caches)
    assert "dtype" in reason and FP8 in reason and "bfloat16" in reason, reason
    refusal = receiver.refusals[-1]
    assert (refusal.field, refusal.local, refusal.remote) == ("dtype", "bfloat16", FP8)
    receiver.abort("r")


def _scaled(layout: KVLayout, **changed: tuple[float, float]) -> KVLayout:
    """`layout` in fp8 with scales (layer, 0.5, 0.25) per layer, except `changed` ones
    (given as layer_N=(k, v))."""
    scales = [(layer, *changed.get(f"layer_{layer}", (0.5, 0.25))) for layer in layout.layers]
    return KVLayout(**{**layout.to_dict(), "dtype": FP8, "kv_scales": scales})


@pytest.mark.parametrize("ends", TRANSPORTS, indirect=True)
def test_kv_scale_mismatch_is_refused_naming_the_first_differing_layer(ends, layout):
    reason, receiver = refused_send(ends, _scaled(layout, layer_1=(0.5, 0.125),
                                                  layer_2=(1.0, 0.25)), _scaled(layout),
                                    random_caches)
    assert "kv_scales" in reason and "layer 1" in reason and "0.125" in reason, reason
    refusal = receiver.refusals[-1]
    assert (refusal.field, refusal.local, refusal.remote) == (
        "kv_scales", "layer 1: k_scale 0.5, v_scale 0.125", "layer 1: k_scale 0.5, v_scale 0.25")
    receiver.abort("r")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_equal_kv_scales_shake_hands_and_move_fp8_bit_exact(transport, layout):
    _move(transport, _scaled(layout), [3, 9, 4], [7, 0, 12])


def test_an_fp8_worker_layout_carries_its_models_kv_scales(tiny_model_dir):
    """What a worker hands its KV end: its layers' scales for an fp8 cache (a layer whose
    scale changes is then refused by a peer with the old ones), none for a float cache."""
    from workers.actors.kv_endpoint import kv_layout

    engine = LLMEngine(dataclasses.replace(_fp8_spec(tiny_model_dir, "x").engine,
                                           role="colocated"))
    layout = kv_layout(engine)
    assert [s[0] for s in layout.kv_scales] == list(layout.layers)
    assert all((k, v) == (1.0, 1.0) for _, k, v in layout.kv_scales)  # no checkpoint scales
    engine.runner.model.layers["1"].self_attn.v_scale.fill_(0.375)
    with pytest.raises(HandshakeMismatch, match="layer 1: k_scale 1.0, v_scale 0.375"):
        check_compatible(kv_layout(engine), layout)
    float_engine = LLMEngine(dataclasses.replace(
        _fp8_spec(tiny_model_dir, "y", "auto").engine, role="colocated"))
    assert kv_layout(float_engine).kv_scales == ()


def _fp8_spec(model_dir, worker_id: str, kv_cache_dtype: str = "fp8"):
    spec = make_spec(model_dir, worker_id, "gloo")
    cache = dataclasses.replace(spec.engine.cache, kv_cache_dtype=kv_cache_dtype)
    return dataclasses.replace(spec, engine=dataclasses.replace(spec.engine, cache=cache))


@pytest.fixture()
def collector():
    collector = ChunkCollector()
    yield collector
    collector.close()


def test_fp8_disaggregated_greedy_equals_colocated_fp8(tiny_model_dir, collector):
    """1P+1D over gloo with fp8 KV on both sides: the prefill worker writes fp8 KV and streams
    it; the decode worker reads it with the same kernels as a colocated fp8 engine, so the
    greedy tokens are the colocated ones exactly, and the KV crossed the wire at one byte per
    element (the per-request figures split a step's bytes evenly among its requests, so
    their sum is checked, to that rounding; test_fp8_blocks_move_... checks exact counts)."""
    prefill = PrefillWorker(_fp8_spec(tiny_model_dir, "prefill-0"))
    decode = DecodeWorker(_fp8_spec(tiny_model_dir, "decode-0"))
    try:
        engine_config = dataclasses.replace(_fp8_spec(tiny_model_dir, "x").engine,
                                            role="colocated")
        colocated_engine = LLMEngine(engine_config)
        runner = colocated_engine.runner
        assert runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
        batch = prompts(4, prefill.ready()["vocab_size"], seed=8, low=9, high=40)
        greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        colocated = [o.token_ids for o in colocated_engine.generate(batch, greedy)]
        reqs = [request(f"fp8-{i}", p, collector.address, 8) for i, p in enumerate(batch)]
        asyncio.run(run_requests(prefill, decode, collector, reqs))
        assert [collector.tokens(r.request_id) for r in reqs] == colocated
        model = runner.model_config
        per_block = 2 * model.num_layers * runner.block_size * model.num_kv_heads * \
            model.head_dim  # fp8: one byte per element
        sent = sum(collector.final(r.request_id).timings["transfer_bytes"] for r in reqs)
        expected = sum(-(-len(p) // runner.block_size) for p in batch) * per_block
        assert expected - 64 * len(reqs) <= sent <= expected, (sent, expected)
        wait_all_free(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_workers_with_different_kv_dtypes_refuse_each_other_by_name(tiny_model_dir, collector):
    prefill = PrefillWorker(_fp8_spec(tiny_model_dir, "prefill-0", "fp8"))
    decode = DecodeWorker(_fp8_spec(tiny_model_dir, "decode-0", "auto"))
    try:
        reqs = [request("kv-dtype", [5, 6, 7, 8, 9], collector.address, 4)]
        asyncio.run(run_requests(prefill, decode, collector, reqs))
        final = collector.final("kv-dtype")
        assert final.finish_reason == "error"
        assert "dtype" in final.error and FP8 in final.error and "float32" in final.error
        wait_all_free(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fp8_1p1d_over_nccl_serves_the_colocated_fp8_text(tiny_model_dir):
    """Real serving on two GPUs: a Ray 1P+1D cluster with `--kv-cache-dtype fp8` (Triton
    kernels, CUDA-graphed decode, NCCL layer-wise transfer) answers every request with the
    text a colocated fp8 engine in this process generates. float32 activations: with bf16,
    the different batchings of the two paths alone would flip near-tied tokens."""
    import ray

    from cluster.config import ClusterConfig
    from router.router_state import RouterConfig
    from tests.e2e.served_cluster import run_workload, served, wait_blocks_free
    from workers.config import CacheConfig, EngineConfig
    from workers.text.tokenizer import Tokenizer

    engine = EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cuda",
                          attention_backend="triton",
                          cache=CacheConfig(block_size=16, num_blocks=256, kv_cache_dtype="fp8"))
    batch = prompts(8, 500, seed=13, low=2, high=60)
    lengths = [1 + (i * 5) % 14 for i in range(len(batch))]
    colocated = LLMEngine(engine)
    tokenizer = Tokenizer(tiny_model_dir)
    workload = []
    for i, (prompt, n) in enumerate(zip(batch, lengths, strict=True)):
        (out,) = colocated.generate([prompt], SamplingParams(max_tokens=n, temperature=0,
                                                              ignore_eos=True))
        workload.append((prompt, n, i % 2 == 0, tokenizer.decode(out.token_ids)))
    del colocated
    torch.cuda.empty_cache()
    ray.init(include_dashboard=False, namespace="kvrelay", ignore_reinit_error=True)
    try:
        config = ClusterConfig(engine=engine, model_name="tiny", name="gpufp8",
                               router=RouterConfig(block_size=16))
        with served(config) as (url, cluster):
            run_workload(url, workload)
            wait_blocks_free(cluster)
            paths = cluster.call("prefill-0", "transfer_paths")
            assert [p["path"] for p in paths.values()] == ["nccl"]
    finally:
        ray.shutdown()
