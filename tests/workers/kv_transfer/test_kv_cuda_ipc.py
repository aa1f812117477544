"""The cuda_ipc KV path: handle fields on the wire, the same-host/GPU handshake, the block copy,
the zmq fallback, transport selection, and (on CUDA) two processes sharing one GPU."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import zmq
from kv_peer_process import random_caches
from test_kv_processes import PeerProcess, assert_landed

from cluster.bench.bench_serve_1gpu import cluster_config
from cluster.bench.bench_serve_1gpu import parse_args as bench_args
from cluster.launcher import kv_transport
from cluster.serve import build_config
from cluster.serve import parse_args as serve_args
from workers.actors.kv_endpoint import transfer_config
from workers.errors import HandshakeMismatch
from workers.kv_transfer import (
    KVLayout,
    Receiver,
    Sender,
    TransferConfig,
    TransferState,
    plan_transfer,
    slice_for_rank,
)
from workers.kv_transfer import sender as sender_module
from workers.kv_transfer.cuda_ipc import (
    IpcExport,
    IpcPeer,
    check_place,
    copy_blocks,
    decode_handle,
    encode_handle,
    host_id,
)
from workers.kv_transfer.messages import Hello, HelloReply
from workers.protocol import decode, encode

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
HERE = {"device": "cuda", "host_id": "host-a/boot-1", "gpu_uuid": "GPU-1111"}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(torch.int16)


def test_handle_fields_survive_msgpack_and_rebuild_args():
    # The exact 15-field layout reduce_tensor returns for a CUDA tensor.
    args = (torch.Tensor, torch.Size([8, 4, 2, 16]), (128, 32, 16, 1), 256,
            torch.storage.TypedStorage, torch.bfloat16, 1, b"\x01\xff" * 32, 1 << 20, 4096,
            False, b"/torch_123_456", 7, b"\x02" * 64, True)
    fields = encode_handle(args)
    layout = KVLayout("m", "bfloat16", 4, 1, 2, 16)
    reply = decode(encode(HelloReply(layout.to_dict(), ipc={**HERE, "caches": [[fields]]})))
    rebuilt = decode_handle(reply.ipc["caches"][0][0], device_index=3)
    assert rebuilt[0] is torch.Tensor and rebuilt[4] is torch.storage.TypedStorage
    assert rebuilt[1] == args[1] and rebuilt[2] == args[2] and rebuilt[3] == 256
    assert rebuilt[5] is torch.bfloat16 and rebuilt[6] == 3  # the importer's own GPU index
    assert rebuilt[7:] == args[7:]
    with pytest.raises(ValueError, match="not a torch dtype"):
        decode_handle({**fields, "dtype": "Tensor"}, 0)


@pytest.mark.parametrize(("remote", "field"), [
    ({**HERE, "host_id": "host-b/boot-1"}, "host_id"),
    ({**HERE, "gpu_uuid": "GPU-2222"}, "gpu_uuid"),
    ({**HERE, "device": "cpu"}, "device"),
])
def test_place_mismatch_names_the_field(remote, field):
    check_place(HERE, dict(HERE))
    with pytest.raises(HandshakeMismatch) as err:
        check_place(HERE, remote)
    assert err.value.field == field and err.value.remote == remote[field]
    with pytest.raises(HandshakeMismatch, match="'device'"):
        check_place({**HERE, "device": "cpu"}, {**HERE, "device": "cpu"})


def _hello(address: str, layout: KVLayout, place: dict) -> HelloReply:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(encode(Hello("probe-sender", layout.to_dict(), "cuda_ipc", place)))
        assert sock.poll(5000), "no HelloReply"
        return decode(sock.recv())
    finally:
        sock.close()


def test_receiver_refuses_another_host_or_gpu_by_name(layout, make_caches):
    receiver = Receiver(layout, make_caches(layout, 4, seed=0), TransferConfig("cuda_ipc"))
    try:
        receiver._ipc.place = dict(HERE)  # as if its caches were on GPU-1111 of host-a
        for field, value in [("host_id", "host-b/boot-9"), ("gpu_uuid", "GPU-2222")]:
            reply = _hello(receiver.address, layout, {**HERE, field: value})
            assert reply.mismatch == [field, HERE[field], value] and not reply.ipc
            assert receiver.refusals[-1].field == field
        # Same place, but CPU tensors have no CUDA IPC handle: refused by name, never a hang.
        reply = _hello(receiver.address, layout, dict(HERE))
        assert reply.mismatch[0] == "cuda_ipc_export" and not reply.ipc
    finally:
        receiver.close()


def test_cuda_ipc_sender_falls_back_to_zmq_off_cuda(layout, make_caches):
    config = TransferConfig("cuda_ipc", probe_bytes=1 << 12, timeout_s=10)
    src, dst = make_caches(layout, 8, seed=1), make_caches(layout, 8, seed=2)
    receiver = Receiver(layout, dst, config)
    sender = Sender(layout, src, config)
    try:
        receiver.expect("r", [5, 0, 3])
        sender.send("r", receiver.address, [2, 7], [5, 0, 3], {"first_token_id": 9},
                    num_tokens=6)
        assert sender.wait("r", 10) is TransferState.DONE, sender.table.get("r").reason
        assert receiver.wait("r", 5) is TransferState.DONE
        assert receiver.refusals[-1].field == "device"  # CPU caches: no cuda_ipc
        assert sender.path(receiver.address) == "zmq"
        for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
            assert torch.equal(_bits(dk[[5, 0]]), _bits(sk[[2, 7]]))
            assert torch.equal(_bits(dv[[5, 0]]), _bits(sv[[2, 7]]))
    finally:
        sender.close()
        receiver.close()


class _SharedMemoryPeer(IpcPeer):
    """The sender's view of the receiver's caches, shared in-process instead of through CUDA
    IPC handles (which need a GPU and two processes: the GPU test below opens real ones), so
    the cuda_ipc handshake, ready/written/ack protocol and failure paths run on CPU."""

    target: list = []

    def __init__(self, info, device, layout):
        self.device, self.layout, self.caches, self.probe_buf = device, layout, self.target, None


@pytest.fixture
def cpu_ipc(monkeypatch, layout, make_caches):
    """(sender, receiver, src, dst) on the cuda_ipc path with in-process memory."""
    monkeypatch.setattr(sender_module, "place", lambda device: dict(HERE))
    monkeypatch.setattr(sender_module, "IpcPeer", _SharedMemoryPeer)
    monkeypatch.setattr(IpcExport, "_build", lambda self: {**HERE, "caches": [], "probe": None})
    config = TransferConfig("cuda_ipc", probe_bytes=1 << 12, timeout_s=10)
    src, dst = make_caches(layout, 8, seed=1), make_caches(layout, 8, seed=2)
    monkeypatch.setattr(_SharedMemoryPeer, "target", dst)
    receiver = Receiver(layout, dst, config)
    receiver._ipc.place = dict(HERE)
    sender = Sender(layout, src, config)
    yield sender, receiver, src, dst
    sender.close()
    receiver.close()


def test_cuda_ipc_protocol_lands_blocks_and_fails_loudly(cpu_ipc):
    sender, receiver, src, dst = cpu_ipc
    before = [(k.clone(), v.clone()) for k, v in dst]
    receiver.expect("r", [6, 1, 4])
    sender.send("r", receiver.address, [3, 0], [6, 1, 4], {"first_token_id": 5}, num_tokens=7)
    assert sender.wait("r", 10) is TransferState.DONE, sender.table.get("r").reason
    assert receiver.wait("r", 5) is TransferState.DONE
    assert receiver.table.get("r").extra == {"first_token_id": 5}
    assert sender.path(receiver.address) == "cuda_ipc"
    for (sk, _), (dk, _), (bk, _) in zip(src, dst, before, strict=True):
        assert torch.equal(_bits(dk[[6, 1]]), _bits(sk[[3, 0]]))
        assert torch.equal(_bits(dk[[4, 7]]), _bits(bk[[4, 7]]))
    # Aborted before the data came: the sender is refused and copies nothing.
    receiver.expect("ab", [2, 5])
    receiver.abort("ab")
    sender.send("ab", receiver.address, [1, 2], [2, 5])
    assert sender.wait("ab", 10) is TransferState.FAILED
    assert "no reservation" in sender.table.get("ab").reason
    for (dk, dv), (bk, bv) in zip(dst, before, strict=True):
        assert torch.equal(_bits(dk[[2, 5]]), _bits(bk[[2, 5]]))
        assert torch.equal(_bits(dv[[2, 5]]), _bits(bv[[2, 5]]))
    # The sender's copy fails (a bad source block): FAILED on both ends with the reason.
    receiver.expect("bad", [3])
    sender.send("bad", receiver.address, [99], [3])
    assert sender.wait("bad", 10) is TransferState.FAILED
    assert receiver.wait("bad", 10) is TransferState.FAILED
    assert "copy failed" in receiver.table.get("bad").reason
    assert "IndexError" in sender.table.get("bad").reason


def test_copy_blocks_whole_and_per_tp_slice(layout, make_caches):
    full_src = make_caches(layout, 10, seed=3)
    dst = make_caches(layout, 10, seed=4)
    before = [(k.clone(), v.clone()) for k, v in dst]
    src_ids, dst_ids = [9, 2, 4], [1, 8, 6]
    copy_blocks(full_src, layout, dst, layout, plan_transfer(layout, layout), src_ids, dst_ids)
    for (sk, _), (dk, _), (bk, _) in zip(full_src, dst, before, strict=True):
        assert torch.equal(_bits(dk[dst_ids]), _bits(sk[src_ids]))
        assert torch.equal(_bits(dk[[0, 2, 3]]), _bits(bk[[0, 2, 3]]))
    # Prefill TP=2 into decode TP=1: each rank writes its half of the heads.
    src_ids, dst_ids = [0, 5], [3, 0]
    for rank in range(2):
        part = slice_for_rank(layout, rank, 2)
        heads = slice(part.kv_head_start, part.kv_head_end)
        src = [(k[:, :, heads].contiguous(), v[:, :, heads].contiguous()) for k, v in full_src]
        copy_blocks(src, part, dst, layout, plan_transfer(part, layout), src_ids, dst_ids)
    for (sk, sv), (dk, dv) in zip(full_src, dst, strict=True):
        assert torch.equal(_bits(dk[dst_ids]), _bits(sk[src_ids]))
        assert torch.equal(_bits(dv[dst_ids]), _bits(sv[src_ids]))


def test_auto_picks_cuda_ipc_when_workers_share_a_gpu():
    config = build_config(serve_args(["--model", "/m/x", "--device", "cuda", "--gpu-share"]))
    assert kv_transport(config) == "cuda_ipc"
    assert kv_transport(dataclasses.replace(config, gpu_share=False)) == "auto"
    cpu = dataclasses.replace(config, engine=dataclasses.replace(config.engine, device="cpu"))
    assert kv_transport(cpu) == "auto"
    explicit = build_config(serve_args(["--model", "/m/x", "--kv-transport", "cuda_ipc"]))
    assert kv_transport(explicit) == "cuda_ipc"
    assert transfer_config("cuda_ipc", "127.0.0.1").transport == "cuda_ipc"
    assert transfer_config("auto", "127.0.0.1").transport == "torch"
    args = bench_args([])
    assert args.kv_transport == "auto"
    bench = cluster_config(args, "/m/llama3-8b.json")
    on_gpu = dataclasses.replace(bench, engine=dataclasses.replace(bench.engine, device="cuda"))
    assert kv_transport(on_gpu) == "cuda_ipc"
    assert host_id() == host_id() and "/" in host_id()


# ---- two processes, one GPU -------------------------------------------------------------


def test_two_processes_off_cuda_fall_back_to_zmq(layout):
    config = TransferConfig("cuda_ipc", probe_bytes=1 << 12, timeout_s=10)
    peer = PeerProcess(layout, config, num_blocks=8, seed=2, device="cpu")
    src = random_caches(layout, 8, seed=1)
    sender = Sender(layout, src, config)
    try:
        peer.call("expect", "r", [4, 7], 10)
        sender.send("r", peer.address, [6, 1], [4, 7])
        assert sender.wait("r", 10) is TransferState.DONE, sender.table.get("r").reason
        assert peer.call("wait", "r", 5)[0] == "done"
        assert sender.path(peer.address) == "zmq"
        assert_landed(peer, src, [6, 1], [4, 7])
    finally:
        sender.close()
        peer.close()


@pytest.mark.gpu
@GPU
def test_two_processes_one_gpu_bit_exact_abort_and_deadline():
    layout = KVLayout("ipc-test", "bfloat16", 16, num_layers=4, num_kv_heads=8, head_dim=64)
    config = TransferConfig("cuda_ipc", probe_bytes=4 << 20, timeout_s=20)
    peer = PeerProcess(layout, config, num_blocks=64, seed=2, device="cuda:0")
    original = random_caches(layout, 64, seed=2)  # the receiver's caches, as it made them
    senders = []
    try:
        src = random_caches(layout, 64, seed=1, device="cuda")
        sender = Sender(layout, src, config)
        senders.append(sender)
        rng = random.Random(0)
        free = list(range(64))
        rng.shuffle(free)
        for i, num_tokens in enumerate([16 * 7 + 5, 16, 16 * 12]):
            n = -(-num_tokens // 16)
            src_ids = rng.sample(range(64), n)
            dst_ids = [free.pop() for _ in range(n + 1)]
            peer.call("expect", f"r{i}", dst_ids, 20)
            sender.send(f"r{i}", peer.address, src_ids, dst_ids, {"first_token_id": i},
                        num_tokens=num_tokens)
            assert sender.wait(f"r{i}", 30) is TransferState.DONE, sender.table.get(f"r{i}")
            assert peer.call("wait", f"r{i}", 10)[0] == "done"
            assert_landed(peer, src, src_ids, dst_ids[:n])
        assert sender.path(peer.address) == "cuda_ipc"
        assert sender.bandwidth(peer.address) > 1.0, sender.bandwidth(peer.address)

        # Prefill TP=2 into this decode: two senders, half of the heads each.
        src_ids, dst_ids = [3, 40, 17], [free.pop() for _ in range(3)]
        peer.call("expect", "tp", dst_ids, 20)
        for rank in range(2):
            part = slice_for_rank(layout, rank, 2)
            heads = slice(part.kv_head_start, part.kv_head_end)
            half = [(k[:, :, heads].contiguous(), v[:, :, heads].contiguous()) for k, v in src]
            senders.append(Sender(part, half, config))
            senders[-1].send("tp", peer.address, src_ids, dst_ids)
        for tp_sender in senders[1:]:
            assert tp_sender.wait("tp", 30) is TransferState.DONE, tp_sender.table.get("tp")
        assert peer.call("wait", "tp", 10)[0] == "done"
        assert_landed(peer, src, src_ids, dst_ids)

        # Aborted before the data came: refused, the blocks keep what they had.
        ids = [free.pop() for _ in range(3)]
        peer.call("expect", "ab", ids, 20)
        peer.call("abort", "ab")
        sender.send("ab", peer.address, [0, 1, 2], ids)
        assert sender.wait("ab", 30) is TransferState.FAILED
        assert "no reservation" in sender.table.get("ab").reason
        assert peer.call("wait", "ab", 5)[0] == "aborted"
        assert_landed(peer, original, ids, ids)

        # No data before the deadline: FAILED on the receiver, by timeout.
        peer.call("expect", "late", [free.pop()], 0.5)
        state, reason = peer.call("wait", "late", 10)
        assert state == "failed" and "timeout" in reason
        untouched = free[:8]
        assert_landed(peer, original, untouched, untouched)
    finally:
        for sender in senders:
            sender.close()
        peer.close()
