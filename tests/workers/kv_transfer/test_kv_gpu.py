"""KV transfer on CUDA: Triton pack/unpack equal the torch path bit for bit, the ZMQ path
between two ends on one GPU (pinned staging, side streams), NCCL between two GPUs; and a
transfer queued right after the engine writes the blocks reads the new values (stream order).
"""

from __future__ import annotations

import pytest
import torch
from kv_peer_process import random_caches
from test_kv_processes import PeerProcess, assert_landed
from test_kv_stream import receiver_killed_mid_stream

from workers.kv_transfer import (
    KVLayout,
    TransferConfig,
    TransferState,
    make_sender,
    plan_transfer,
    slice_for_rank,
)
from workers.kv_transfer.packing import pack, unpack

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LAYOUT = KVLayout("gpu-test", "bfloat16", 16, num_layers=4, num_kv_heads=8, head_dim=128)


def _caches(layout: KVLayout, device: str, seed: int, num_blocks: int = 64):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (num_blocks, layout.block_size, len(layout.kv_heads), layout.head_dim)
    return [tuple(torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
                  for _ in range(2)) for _ in layout.layers]


@pytest.mark.parametrize("rank", [None, 0, 1])
def test_cuda_pack_and_unpack_equal_the_cpu_path(rank):
    sender = LAYOUT if rank is None else slice_for_rank(LAYOUT, rank, 2)
    plan = plan_transfer(sender, LAYOUT)
    gpu_src = _caches(sender, "cuda", seed=1)
    cpu_src = [(k.cpu(), v.cpu()) for k, v in gpu_src]
    ids = [7, 3, 50, 12, 0]
    gpu_buf = pack(gpu_src, sender, plan, ids)
    assert torch.equal(gpu_buf.cpu().view(torch.int16),
                       pack(cpu_src, sender, plan, ids).view(torch.int16))
    gpu_dst = _caches(LAYOUT, "cuda", seed=2)
    cpu_dst = [(k.cpu(), v.cpu()) for k, v in gpu_dst]
    unpack(gpu_buf, gpu_dst, LAYOUT, plan, [9, 8, 1, 40, 33])
    unpack(gpu_buf.cpu(), cpu_dst, LAYOUT, plan, [9, 8, 1, 40, 33])
    torch.cuda.synchronize()
    for (gk, gv), (ck, cv) in zip(gpu_dst, cpu_dst, strict=True):
        assert torch.equal(gk.cpu(), ck) and torch.equal(gv.cpu(), cv)


def _transfer_after_write(sender_device: str, receiver_device: str, transport: str):
    """The receiver runs in its own process, as in serving (see the staged-messages test)."""
    config = TransferConfig(transport=transport, probe_bytes=8 << 20)
    peer = PeerProcess(LAYOUT, config, num_blocks=64, seed=4, device=receiver_device)
    src = _caches(LAYOUT, sender_device, 3)
    sender = make_sender(LAYOUT, src, config)
    try:
        peer.call("expect", "r", [5, 6, 7], 60)
        # The engine's last write, queued on its stream just before the send.
        with torch.cuda.device(src[0][0].device):
            for k, v in src:
                k[[20, 21]] = 1.5
                v[[20, 21]] = -2.5
        sender.send("r", peer.address, [20, 21, 22], [5, 6, 7], {"first_token_id": 1})
        assert sender.wait("r", 60) is TransferState.DONE, sender.table.get("r").reason
        state, reason = peer.call("wait", "r", 10)
        assert state == TransferState.DONE.value, reason
        assert_landed(peer, src, [20, 21, 22], [5, 6, 7])
        return sender.path(peer.address), sender.bandwidth(peer.address)
    finally:
        sender.close()
        peer.close()


def test_zmq_path_between_two_ends_on_one_gpu():
    path, gbps = _transfer_after_write("cuda:0", "cuda:0", "zmq")
    assert path == "zmq" and gbps > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_path_between_two_gpus():
    path, gbps = _transfer_after_write("cuda:1", "cuda:0", "torch")
    assert path == "nccl" and gbps > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_receiver_killed_mid_transfer_fails_the_sender_which_stays_healthy():
    """On two GPUs: the receiver's process dies with the sender's NCCL sends in flight; the
    sender's deadline tears the pair down (aborting the communicator ends its sends), the
    worker stays healthy, a new pair works, and close returns within 10 s."""
    with torch.cuda.device("cuda:1"):
        receiver_killed_mid_stream(LAYOUT, "cuda:1", "cuda:0")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_nccl_staged_messages_cycle_their_buffers_and_land_byte_equal(dtype):
    """A request sent whole as more staged messages than STAGING_SLOTS (one layer each), so
    both ends reuse their staging buffers in stream order: every layer lands byte-equal. The
    receiver runs in its own process, as in serving (both ends of an NCCL pair built at once
    by two threads of one process crashed inside ProcessGroupNCCL on 2x H200, 2026-11-28)."""
    layout = KVLayout("gpu-staged", dtype, 16, num_layers=12, num_kv_heads=8, head_dim=128)
    src_ids, dst_ids = list(range(3, 40)), list(range(20, 57))
    layer_bytes = 2 * len(src_ids) * 16 * 8 * 128 * layout.element_size
    config = TransferConfig(probe_bytes=8 << 20, message_bytes=layer_bytes)
    peer = PeerProcess(layout, config, num_blocks=64, seed=6, device="cuda:0")
    src = random_caches(layout, 64, seed=5, device="cuda:1")
    sender = make_sender(layout, src, config)
    try:
        peer.call("expect", "r", dst_ids, 60)
        with torch.cuda.device("cuda:1"):
            sender.send("r", peer.address, src_ids, dst_ids)
            assert sender.wait("r", 60) is TransferState.DONE, sender.table.get("r").reason
        state, reason = peer.call("wait", "r", 10)
        assert state == TransferState.DONE.value, reason
        assert_landed(peer, src, src_ids, dst_ids)
    finally:
        sender.close()
        peer.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_nccl_small_request_sent_whole_is_one_message_by_default(dtype):
    """Default config on CUDA (TransferConfig.coalesce_whole_below_bytes: 1 MiB where one
    launch packs every layer): a 16-token request of Llama-3-8B's KV shape (64 messages of
    16-32 KiB direct) goes as one staged message and lands byte-equal; a 4k-token one (4-8
    MiB messages) still goes direct, K and V of each layer."""
    layout = KVLayout("llama-3-8b-kv", dtype, 16, num_layers=32, num_kv_heads=8, head_dim=128)
    config = TransferConfig(probe_bytes=8 << 20)
    peer = PeerProcess(layout, config, num_blocks=260, seed=8, device="cuda:0")
    src = random_caches(layout, 260, seed=7, device="cuda:1")
    sender = make_sender(layout, src, config)
    try:
        with torch.cuda.device("cuda:1"):
            sender.connect(peer.address)
            assert sender.wait_ready(peer.address, 60)
        for rid, src_ids, dst_ids, messages in [("small", [9], [4], 1),
                                                ("large", list(range(2, 258)),
                                                 list(range(3, 259)), 64)]:
            peer.call("expect", rid, dst_ids, 60)
            before = sender.sends(peer.address)[0]
            with torch.cuda.device("cuda:1"):
                sender.send(rid, peer.address, src_ids, dst_ids)
                assert sender.wait(rid, 60) is TransferState.DONE, sender.table.get(rid).reason
            assert sender.sends(peer.address)[0] - before == messages
            state, reason = peer.call("wait", rid, 10)
            assert state == TransferState.DONE.value, reason
            assert_landed(peer, src, src_ids, dst_ids)
    finally:
        sender.close()
        peer.close()
