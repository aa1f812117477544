"""The in-process backend keeps the contract: states, handshake, reservations, callbacks."""

from __future__ import annotations

import torch

from workers.kv_transfer import (
    InProcessHub,
    InProcessReceiver,
    InProcessSender,
    KVLayout,
    TransferState,
    slice_for_rank,
)


def test_tp2_senders_complete_a_tp1_reservation_and_call_back_once(layout, make_caches):
    hub, done = InProcessHub(), []
    whole = make_caches(layout, 6, seed=1)
    dst = make_caches(layout, 6, seed=2)
    receiver = InProcessReceiver(hub, "decode-0", layout, dst,
                                 on_done=lambda rid, extra: done.append((rid, extra)))
    receiver.expect("r", [4, 0, 2])
    for rank in range(2):
        half = slice_for_rank(layout, rank, 2)
        heads = slice(half.kv_head_start, half.kv_head_end)
        sender = InProcessSender(hub, half, [(k[:, :, heads].clone(), v[:, :, heads].clone())
                                             for k, v in whole])
        sender.send("r", "decode-0", [1, 5, 3], [4, 0, 2], {"first_token_id": 3}, num_tokens=9)
        assert sender.state("r") is TransferState.DONE
        assert receiver.in_flight("r") == (rank == 0)
    assert receiver.state("r") is TransferState.DONE and done == [("r", {"first_token_id": 3})]
    for (wk, wv), (dk, dv) in zip(whole, dst, strict=True):
        assert torch.equal(dk[[4, 0, 2]], wk[[1, 5, 3]]) and torch.equal(dv[[4, 0, 2]],
                                                                          wv[[1, 5, 3]])


def test_mismatch_unknown_receiver_and_abort_fail_the_sender(layout, make_caches):
    hub = InProcessHub()
    dst = make_caches(layout, 4, seed=3)
    receiver = InProcessReceiver(hub, "decode-0", layout, dst)
    other = KVLayout(**{**layout.to_dict(), "dtype": "float16"})
    sender = InProcessSender(hub, other, make_caches(other, 4, seed=4))
    receiver.expect("r", [0])
    sender.send("r", "decode-0", [1], [0])
    assert sender.state("r") is TransferState.FAILED and "dtype" in sender.table.get("r").reason
    sender = InProcessSender(hub, layout, make_caches(layout, 4, seed=5))
    sender.send("x", "decode-9", [1], [0])
    assert "no receiver" in sender.table.get("x").reason
    receiver.abort("r")
    sender.send("r", "decode-0", [1], [0])
    assert sender.state("r") is TransferState.FAILED
    assert receiver.state("r") is TransferState.ABORTED
