"""Sender and Receiver over real loopback sockets: gloo per-pair groups and ZMQ frames.

Both ends live in this process on their own threads (each with its own communicator);
tests/workers/kv_transfer/test_kv_processes.py runs the two ends in two processes.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
import zmq

from workers.errors import HandshakeMismatch, TransferFailed, TransferTimeout
from workers.kv_transfer import (
    KVLayout,
    KVSender,
    Receiver,
    TransferConfig,
    TransferState,
    make_sender,
    slice_for_rank,
)

TRANSPORTS = ["torch", "zmq"]
PATHS = {"torch": "gloo", "zmq": "zmq"}


class Ends:
    """A receiver and the senders of one test, closed at teardown; records callbacks."""

    def __init__(self, config: TransferConfig):
        self.config = config
        self.done: list[tuple[str, dict]] = []
        self.failed: list[tuple[str, TransferState, str]] = []
        self.closing: list = []

    def receiver(self, layout: KVLayout, caches) -> Receiver:
        receiver = Receiver(layout, caches, self.config,
                            on_done=lambda rid, extra: self.done.append((rid, extra)),
                            on_failed=lambda rid, st, why: self.failed.append((rid, st, why)))
        self.closing.append(receiver)
        return receiver

    def sender(self, layout: KVLayout, caches) -> KVSender:
        sender = make_sender(layout, caches, self.config)
        self.closing.append(sender)
        return sender


def refused_send(ends: Ends, receiver_layout: KVLayout, sender_layout: KVLayout, make_caches):
    """One send of request 'r' between new ends of these layouts, which the handshake
    refuses (the sender's error a HandshakeMismatch); returns (failure reason, receiver)."""
    receiver = ends.receiver(receiver_layout, make_caches(receiver_layout, 4, seed=5))
    sender = ends.sender(sender_layout, make_caches(sender_layout, 4, seed=6))
    receiver.expect("r", [0, 1])
    sender.send("r", receiver.address, [0], [0, 1])
    assert sender.wait("r", 20) is TransferState.FAILED
    assert isinstance(sender.error("r"), HandshakeMismatch)
    return sender.table.get("r").reason, receiver


@pytest.fixture
def ends(request):
    config = getattr(request, "param", None) or TransferConfig(probe_bytes=1 << 16)
    made = Ends(config)
    yield made
    for end in reversed(made.closing):
        end.close()


def _config(transport: str, **overrides) -> TransferConfig:
    return TransferConfig(transport=transport, probe_bytes=1 << 16, **overrides)


@pytest.mark.parametrize("ends", [_config(t) for t in TRANSPORTS], indirect=True,
                         ids=TRANSPORTS)
def test_random_blocks_arrive_bit_exact_with_first_token(ends, layout, make_caches):
    src, dst = make_caches(layout, 16, seed=1), make_caches(layout, 16, seed=2)
    before = [(k.clone(), v.clone()) for k, v in dst]
    receiver, sender = ends.receiver(layout, dst), ends.sender(layout, src)
    rng = random.Random(0)
    free_dst, moved = list(range(16)), []
    for i, num_tokens in enumerate([13, 4, 9]):  # 4 / 1 / 3 blocks of 4, last ones partial
        src_ids = rng.sample(range(16), -(-num_tokens // 4))
        dst_ids = [free_dst.pop(rng.randrange(len(free_dst))) for _ in range(len(src_ids) + 1)]
        receiver.expect(f"r{i}", dst_ids)
        sender.send(f"r{i}", receiver.address, src_ids, dst_ids, {"first_token_id": 100 + i},
                    num_tokens=num_tokens)
        assert sender.wait(f"r{i}", 20) is TransferState.DONE, sender.table.get(f"r{i}").reason
        assert receiver.wait(f"r{i}", 5) is TransferState.DONE
        moved.append((src_ids, dst_ids[:len(src_ids)]))
    assert ends.done == [(f"r{i}", {"first_token_id": 100 + i}) for i in range(3)]
    touched = {d for _, dst_ids in moved for d in dst_ids}
    for (sk, sv), (dk, dv), (bk, bv) in zip(src, dst, before, strict=True):
        for src_ids, dst_ids in moved:
            assert torch.equal(dk[dst_ids].view(torch.int16), sk[src_ids].view(torch.int16))
            assert torch.equal(dv[dst_ids].view(torch.int16), sv[src_ids].view(torch.int16))
        rest = [b for b in range(16) if b not in touched]
        assert torch.equal(dk[rest], bk[rest]) and torch.equal(dv[rest], bv[rest])
    transport = ends.config.transport
    assert sender.path(receiver.address) == PATHS[transport]
    assert receiver.path(sender.sender_id) == PATHS[transport]
    assert sender.bandwidth(receiver.address) > 0
    assert receiver.bandwidth(sender.sender_id) == sender.bandwidth(receiver.address)


@pytest.mark.parametrize("ends", [_config("torch")], indirect=True)
def test_two_prefill_tp_ranks_fill_one_decode_rank(ends, layout, make_caches):
    whole = make_caches(layout, 8, seed=3)
    dst = make_caches(layout, 8, seed=4)
    receiver = ends.receiver(layout, dst)
    halves = [slice_for_rank(layout, r, 2) for r in range(2)]
    senders = [ends.sender(h, [(k[:, :, h.kv_head_start:h.kv_head_end].clone(),
                                v[:, :, h.kv_head_start:h.kv_head_end].clone())
                               for k, v in whole]) for h in halves]
    receiver.expect("r", [6, 1, 3])
    senders[0].send("r", receiver.address, [2, 5], [6, 1, 3], {"first_token_id": 9})
    assert senders[0].wait("r", 20) is TransferState.DONE
    assert receiver.state("r") is TransferState.SENDING and receiver.in_flight("r")
    senders[1].send("r", receiver.address, [2, 5], [6, 1, 3], {"first_token_id": 9})
    assert receiver.wait("r", 20) is TransferState.DONE
    for (wk, wv), (dk, dv) in zip(whole, dst, strict=True):
        assert torch.equal(dk[[6, 1]], wk[[2, 5]]) and torch.equal(dv[[6, 1]], wv[[2, 5]])


@pytest.mark.parametrize("ends", [_config(t) for t in TRANSPORTS], indirect=True, ids=TRANSPORTS)
def test_block_size_mismatch_is_refused_naming_the_field(ends, layout, make_caches):
    other = KVLayout(**{**layout.to_dict(), "block_size": 8})
    reason, receiver = refused_send(ends, layout, other, make_caches)
    assert "block_size" in reason and "8" in reason and "4" in reason
    assert receiver.refusals[-1].field == "block_size"
    assert (receiver.refusals[-1].local, receiver.refusals[-1].remote) == (4, 8)
    assert receiver.in_flight("r")  # the decode side frees it by abort or by its deadline


@pytest.mark.parametrize("ends", [_config("torch")], indirect=True)
def test_reservation_without_data_fails_at_its_deadline(ends, layout, make_caches):
    receiver = ends.receiver(layout, make_caches(layout, 4, seed=7))
    start = time.monotonic()
    receiver.expect("r", [0, 1], timeout_s=0.3)
    assert receiver.wait("r", 5) is TransferState.FAILED
    assert 0.3 <= time.monotonic() - start < 0.3 + 0.5
    assert not receiver.in_flight("r")
    assert ends.failed[0][:2] == ("r", TransferState.FAILED) and "timeout" in ends.failed[0][2]
    assert isinstance(receiver.error("r"), TransferTimeout)
    assert receiver.error("r").deadline_s == 0.3


@pytest.mark.parametrize("ends", [_config(t) for t in TRANSPORTS], indirect=True, ids=TRANSPORTS)
def test_aborted_reservation_takes_no_data(ends, layout, make_caches):
    dst = make_caches(layout, 4, seed=8)
    before = [(k.clone(), v.clone()) for k, v in dst]
    receiver = ends.receiver(layout, dst)
    sender = ends.sender(layout, make_caches(layout, 4, seed=9))
    receiver.expect("r", [2, 3])
    receiver.abort("r")
    receiver.abort("r")
    assert receiver.state("r") is TransferState.ABORTED and not receiver.in_flight("r")
    sender.send("r", receiver.address, [0, 1], [2, 3])
    assert sender.wait("r", 20) is TransferState.FAILED
    assert "no reservation" in sender.table.get("r").reason
    assert isinstance(sender.error("r"), TransferFailed) and receiver.error("r") is None
    assert all(torch.equal(d, b) for (dk, dv), (bk, bv) in zip(dst, before, strict=True)
               for d, b in ((dk, bk), (dv, bv)))
    assert ends.failed == [("r", TransferState.ABORTED, "aborted")]


@pytest.mark.parametrize("ends", [_config("torch", idle_evict_s=0.2)], indirect=True)
def test_idle_pairs_are_evicted_and_rebuilt_on_next_use(ends, layout, make_caches):
    src, dst = make_caches(layout, 4, seed=10), make_caches(layout, 4, seed=11)
    receiver, sender = ends.receiver(layout, dst), ends.sender(layout, src)
    for i in range(2):
        receiver.expect(f"r{i}", [i])
        sender.send(f"r{i}", receiver.address, [3 - i], [i])
        assert sender.wait(f"r{i}", 20) is TransferState.DONE
        assert sender.pairs() == [receiver.address] and receiver.peers() == [sender.sender_id]
        deadline = time.monotonic() + 5
        while (sender.pairs() or receiver.peers()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sender.pairs() == [] and receiver.peers() == []
        assert torch.equal(dst[0][0][i], src[0][0][3 - i])


def test_close_ends_a_transfer_waiting_on_a_silent_receiver_at_once(layout, make_caches):
    silent = zmq.Context.instance().socket(zmq.ROUTER)  # accepts bytes, never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    sender = make_sender(layout, make_caches(layout, 4, seed=12), _config("zmq"))
    try:
        sender.send("r", f"tcp://127.0.0.1:{port}", [0], [1], timeout_s=30)
        assert sender.wait("r", 0.3) is TransferState.RESERVED  # handshake unanswered
        assert sender.in_flight("r")
        start = time.monotonic()
        sender.close()
        assert time.monotonic() - start < 2.0
        assert sender.state("r") is TransferState.FAILED
        assert "closed" in sender.table.get("r").reason
    finally:
        sender.close()
        silent.close(linger=0)
