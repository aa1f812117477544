"""The torch transport's layer-wise stream over real gloo pairs, driven as the prefill engine
drives it: `open` when the prefill is queued, per step `before_step` then `layer_done` for
each layer right after that layer's KV is written, `finish` with token 1.

Proves: each layer lands bit-exact as written (chunked prefill re-sends a partial block);
contiguous runs, scattered blocks (packed) and head-sliced TP plans; an abort mid-stream ends
both ends and every block is released once the posted operations end, with the pair usable
afterwards; a deadline mid-stream fails both ends; a receiver killed mid-stream fails the
sender within its deadline and `close` returns at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from kv_peer_process import random_caches
from test_kv_processes import PeerProcess, assert_landed

from workers.kv_transfer import (
    KVLayout,
    Receiver,
    TorchSender,
    TransferConfig,
    TransferState,
    slice_for_rank,
)
from workers.kv_transfer.stream_plan import PrefillSpan

CONFIG = TransferConfig(probe_bytes=1 << 12, timeout_s=10)


@pytest.fixture
def pair(layout):
    """(sender caches, receiver caches, sender, receiver), a live pair (set up eagerly)."""
    src, dst = random_caches(layout, 32, seed=1), random_caches(layout, 32, seed=2)
    receiver = Receiver(layout, dst, CONFIG)
    sender = TorchSender(layout, src, CONFIG)
    sender.connect(receiver.address)
    assert sender.wait_ready(receiver.address, 20)
    yield src, dst, sender, receiver
    sender.close()
    receiver.close()


def _write_layer(caches, layer: int, block_table: list[int], start: int, end: int, bs: int,
                 value: float) -> None:
    """What the engine's forward does to one layer: KV of tokens [start, end)."""
    k, v = caches[layer]
    for pos in range(start, end):
        block, offset = block_table[pos // bs], pos % bs
        k[block, offset] = value + pos
        v[block, offset] = -value - pos


def _prefill(sender: TorchSender, src, steps: list[list[PrefillSpan]], layout: KVLayout,
             value: float = 1.0, between=None) -> None:
    """Runs prefill steps: each layer written, then `layer_done`, as the model does."""
    for n, spans in enumerate(steps):
        sender.before_step(spans)
        for layer in range(len(src)):
            for span in spans:
                _write_layer(src, layer, span.block_table, span.start, span.end,
                             layout.block_size, value)
            sender.layer_done(layer)
        if between is not None:
            between(n)


def _same(src, dst, src_ids, dst_ids) -> bool:
    return all(torch.equal(dk[dst_ids].view(torch.int16), sk[src_ids].view(torch.int16)) and
               torch.equal(dv[dst_ids].view(torch.int16), sv[src_ids].view(torch.int16))
               for (sk, sv), (dk, dv) in zip(src, dst, strict=True))


@pytest.mark.parametrize("scattered", [False, True], ids=["contiguous-runs", "scattered-packed"])
def test_chunked_prefill_streams_every_layer_bit_exact(pair, layout, scattered):
    src, dst, sender, receiver = pair
    # 14 tokens in chunks of 5, 5, 4: blocks of 4, so chunks end mid-block and the next chunk
    # sends that block again, complete.
    src_ids = [20, 3, 11, 7] if scattered else [4, 5, 6, 7]
    dst_ids = [30, 1, 17, 9, 25] if scattered else [10, 11, 12, 13, 14]
    receiver.expect("r", dst_ids)
    sender.open("r", receiver.address, dst_ids, 14)
    chunks = [(0, 5), (5, 10), (10, 14)]
    _prefill(sender, src, [[PrefillSpan("r", a, b, src_ids)] for a, b in chunks], layout)
    sender.finish("r", extra={"first_token_id": 42})
    assert sender.wait("r", 20) is TransferState.DONE, sender.table.get("r").reason
    assert receiver.wait("r", 5) is TransferState.DONE
    assert receiver.table.get("r").extra["first_token_id"] == 42
    assert _same(src, dst, src_ids, dst_ids[:4])
    assert receiver.table.get("r").num_bytes > 0


def test_two_requests_in_one_step_and_tp2_senders_fill_one_receiver(layout):
    dst = random_caches(layout, 16, seed=5)
    whole = random_caches(layout, 16, seed=6)
    receiver = Receiver(layout, dst, CONFIG)
    halves = [slice_for_rank(layout, rank, 2) for rank in range(2)]
    senders = [TorchSender(h, [(k[:, :, h.kv_head_start:h.kv_head_end].clone(),
                                v[:, :, h.kv_head_start:h.kv_head_end].clone())
                               for k, v in whole], CONFIG) for h in halves]
    try:
        for rid, ids in (("a", [0, 1]), ("b", [5, 6, 7])):
            receiver.expect(rid, ids)
            for sender in senders:
                sender.open(rid, receiver.address, ids, 4 * len(ids) - 1)
        for sender in senders:
            sender.before_step([PrefillSpan("a", 0, 7, [2, 3]),
                                PrefillSpan("b", 0, 11, [8, 9, 10])])
            for layer in range(layout.num_layers):
                sender.layer_done(layer)
            for rid in ("a", "b"):
                sender.finish(rid, extra={"first_token_id": 1})
        for sender in senders:
            assert sender.wait("a", 20) is TransferState.DONE
            assert sender.wait("b", 20) is TransferState.DONE
        assert receiver.wait("a", 5) is TransferState.DONE
        assert _same(whole, dst, [2, 3], [0, 1]) and _same(whole, dst, [8, 9, 10], [5, 6, 7])
    finally:
        for end in (*senders, receiver):
            end.close()


def _quiet(end, rid: str) -> threading.Event:
    quiet = threading.Event()
    end.when_quiet(rid, quiet.set)
    return quiet


def test_abort_mid_stream_releases_blocks_on_both_ends_and_the_pair_goes_on(pair, layout):
    src, dst, sender, receiver = pair
    receiver.expect("r", [0, 1, 2, 3])
    sender.open("r", receiver.address, [0, 1, 2, 3], 16)
    receiver_aborted = []

    def abort_both(step: int) -> None:  # between steps, as the router's abort arrives
        if step == 0:
            sender.abort("r")
            receiver.abort("r")
            receiver_aborted.append((_quiet(sender, "r"), _quiet(receiver, "r")))

    steps = [[PrefillSpan("r", 0, 8, [4, 5, 6, 7])], [PrefillSpan("r", 8, 16, [4, 5, 6, 7])]]
    _prefill(sender, src, steps, layout, between=abort_both)
    sender.finish("r", extra={"first_token_id": 1})
    assert sender.state("r") is TransferState.ABORTED
    assert receiver.state("r") is TransferState.ABORTED
    for quiet in receiver_aborted[0]:
        assert quiet.wait(10), "blocks still pinned after the posted operations ended"
    # The stream's posted operations all matched: the next transfer lands exactly.
    receiver.expect("next", [8, 9])
    sender.send("next", receiver.address, [1, 2], [8, 9], {"first_token_id": 3})
    assert sender.wait("next", 20) is TransferState.DONE, sender.table.get("next").reason
    assert _same(src, dst, [1, 2], [8, 9])


def test_reservation_aborted_before_the_data_still_drains_and_fails_the_sender(pair, layout):
    src, dst, sender, receiver = pair
    before = [(k.clone(), v.clone()) for k, v in dst]
    receiver.expect("gone", [3, 4])
    receiver.abort("gone")  # the decode side's abort reached it first
    sender.open("gone", receiver.address, [3, 4], 8)
    _prefill(sender, src, [[PrefillSpan("gone", 0, 8, [0, 1])]], layout)
    sender.finish("gone", extra={"first_token_id": 1})
    assert sender.wait("gone", 20) is TransferState.FAILED
    assert "no reservation" in sender.table.get("gone").reason
    assert _same(before, dst, [3, 4], [3, 4])  # drained into a discard buffer, not the blocks
    receiver.expect("after", [3, 4])
    sender.send("after", receiver.address, [5, 6], [3, 4], {"first_token_id": 2})
    assert sender.wait("after", 20) is TransferState.DONE


def test_deadline_mid_stream_fails_both_ends_and_frees(layout):
    src, dst = random_caches(layout, 8, seed=1), random_caches(layout, 8, seed=2)
    config = TransferConfig(probe_bytes=0, timeout_s=1.0)
    receiver, sender = Receiver(layout, dst, config), TorchSender(layout, src, config)
    try:
        receiver.expect("slow", [0, 1, 2])
        sender.open("slow", receiver.address, [0, 1, 2], 12)
        _prefill(sender, src, [[PrefillSpan("slow", 0, 4, [5, 6, 7])]], layout)
        # ... and the rest of the prefill never comes.
        assert sender.wait("slow", 5) is TransferState.FAILED
        assert receiver.wait("slow", 5) is TransferState.FAILED
        assert "timeout" in receiver.table.get("slow").reason
        assert _quiet(sender, "slow").wait(5) and _quiet(receiver, "slow").wait(5)
    finally:
        sender.close()
        receiver.close()


def test_receiver_killed_mid_stream_fails_the_sender_which_stays_healthy(layout):
    receiver_killed_mid_stream(layout, "cpu", "cpu")


def receiver_killed_mid_stream(layout: KVLayout, sender_device: str,
                               receiver_device: str) -> None:
    """The receiver's process is killed after the step's first layer went out: the sender's
    transfer fails within its deadline, its blocks are released once its posted sends end
    (the pair is torn down), a new receiver pairs and gets data, and close is quick. Each
    receiver runs in its own process, as in serving (one process building both ends of an
    NCCL pair crashed inside ProcessGroupNCCL)."""
    config = TransferConfig(probe_bytes=1 << 12, timeout_s=2.0)
    peer = PeerProcess(layout, config, num_blocks=16, seed=2, device=receiver_device)
    src = random_caches(layout, 16, seed=1, device=sender_device)
    sender = TorchSender(layout, src, config)
    fresh = None
    try:
        sender.connect(peer.address)
        assert sender.wait_ready(peer.address, 60)
        peer.call("expect", "r", [0, 1, 2, 3], 10)
        sender.open("r", peer.address, [0, 1, 2, 3], 16)
        sender.before_step([PrefillSpan("r", 0, 16, [4, 5, 6, 7])])
        sender.layer_done(0)
        os.kill(peer.process.pid, signal.SIGKILL)
        peer.process.join(5)
        for layer in range(1, layout.num_layers):
            sender.layer_done(layer)
        sender.finish("r", extra={"first_token_id": 1})
        start = time.monotonic()
        assert sender.wait("r", 10) is TransferState.FAILED
        assert time.monotonic() - start < 2.0 + 2.0
        assert _quiet(sender, "r").wait(2 * config.timeout_s + 10)
        fresh = PeerProcess(layout, config, num_blocks=16, seed=3, device=receiver_device)
        fresh.call("expect", "again", [1, 2], 30)
        sender.send("again", fresh.address, [3, 4], [1, 2], {"first_token_id": 2})
        assert sender.wait("again", 30) is TransferState.DONE, sender.table.get("again").reason
        state, reason = fresh.call("wait", "again", 10)
        assert state == TransferState.DONE.value, reason
        assert_landed(fresh, src, [3, 4], [1, 2])
        fresh.close()  # the receiving end goes first, as before the sender's timed close
    finally:
        start = time.monotonic()
        sender.close()
        closed_s = time.monotonic() - start
        for end in (fresh, peer):  # idempotent: ends the peers on any failure above
            if end is not None:
                end.close()
        assert closed_s < 10


def test_pairs_are_bounded_least_recently_used_idle_one_evicted(layout):
    config = TransferConfig(probe_bytes=0, timeout_s=10, max_pairs=1)
    src = random_caches(layout, 8, seed=1)
    receivers = [Receiver(layout, random_caches(layout, 8, seed=2 + i), config) for i in range(2)]
    sender = TorchSender(layout, src, config)
    try:
        for round_ in range(2):
            for i, receiver in enumerate(receivers):
                rid = f"r{round_}{i}"
                receiver.expect(rid, [1, 2])
                sender.send(rid, receiver.address, [3, 4], [1, 2], {"first_token_id": 1})
                assert sender.wait(rid, 20) is TransferState.DONE, sender.table.get(rid).reason
                # The other one is evicted once its sends have ended (the control thread's
                # next tick at the latest).
                deadline = time.monotonic() + 10
                while sender.pairs() != [receiver.address]:
                    assert time.monotonic() < deadline, sender.pairs()
                    time.sleep(0.05)
    finally:
        sender.close()
        for receiver in receivers:
            receiver.close()
