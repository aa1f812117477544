"""A small request sent whole goes as ONE staged message (TransferConfig.
coalesce_whole_below_bytes): its fixed cost is one post per end, not 2 x layers (a 16-token
request of Llama-3-8B's shape: 64 messages of 16-32 KiB, ~0.8 ms of host posting per end on
2x H200). Real gloo pairs (sender and Receiver in one process, two threads' worth of ends).

Proves: by default the rule stages only where one launch packs every layer (CUDA), only a
request sent whole (a layer-wise stream keeps its per-layer messages) and only below the size
(a 4k-token request still goes direct); a small request lands byte-exact, bf16 and fp8, as one
message of all its bytes; a reservation aborted before the data drains the message without
touching the blocks and fails the sender, both ends let every block go, and the pair goes on;
an abort on both ends right after the send lets every block go on both ends.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from kv_peer_process import random_caches

from workers.kv_transfer import KVLayout, Receiver, TorchSender, TransferConfig, TransferState
from workers.kv_transfer.layout import plan_transfer
from workers.kv_transfer.stream_plan import (
    COALESCE_WHOLE_BYTES,
    block_runs,
    message_sizes,
    staged_bytes,
    wire_plan,
)

# Explicit, so the CPU (gloo) pair takes the path CUDA takes by default.
CONFIG = TransferConfig(probe_bytes=1 << 12, timeout_s=10,
                        coalesce_whole_below_bytes=COALESCE_WHOLE_BYTES)
LAYERS = 6


def _layout(dtype: str) -> KVLayout:
    return KVLayout("small-whole", dtype, block_size=4, num_layers=LAYERS, num_kv_heads=2,
                    head_dim=8)


def _messages(config: TransferConfig, dtype: str, tokens: int, whole: bool,
              one_launch: bool) -> list[int]:
    """Message sizes of one contiguous request of Llama-3-8B's KV shape."""
    layout = KVLayout("llama-3-8b", dtype, 16, 32, 8, 128)
    plan = plan_transfer(layout, layout)
    blocks = tokens // 16
    wire = wire_plan(config, True, 1, staged_bytes(layout, plan, blocks), whole, one_launch)
    return message_sizes(layout, plan, [(0, 0, blocks)], wire)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_default_rule_one_message_for_a_small_request_on_cuda_only(dtype):
    config = TransferConfig()
    small = _messages(config, dtype, 16, whole=True, one_launch=True)
    assert len(small) == 1 and small[0] == 32 * 2 * 16 * 8 * 128 * (1 if "float8" in dtype else 2)
    assert len(_messages(config, dtype, 16, whole=True, one_launch=False)) == 64  # CPU pack
    assert len(_messages(config, dtype, 16, whole=False, one_launch=True)) == 64  # a stream
    assert len(_messages(config, dtype, 4096, whole=True, one_launch=True)) == 64  # 4-8 MiB
    # 0 turns it off; coalesce_below_bytes still stages on its own.
    off = dataclasses.replace(config, coalesce_whole_below_bytes=0)
    assert len(_messages(off, dtype, 16, whole=True, one_launch=True)) == 64
    assert len(_messages(dataclasses.replace(off, coalesce_below_bytes=1 << 20), dtype, 16,
                         whole=True, one_launch=False)) == 1


@pytest.fixture(params=["bfloat16", "float8_e4m3fn"])
def pair(request):
    """(layout, sender caches, receiver caches, sender, receiver): a live gloo pair."""
    layout = _layout(request.param)
    src, dst = random_caches(layout, 16, seed=1), random_caches(layout, 16, seed=2)
    receiver = Receiver(layout, dst, CONFIG)
    sender = TorchSender(layout, src, CONFIG)
    sender.connect(receiver.address)
    assert sender.wait_ready(receiver.address, 20)
    yield layout, src, dst, sender, receiver
    sender.close()
    receiver.close()


def _same(src, dst, src_ids, dst_ids) -> bool:
    return all(torch.equal(dk[dst_ids].view(torch.uint8), sk[src_ids].view(torch.uint8)) and
               torch.equal(dv[dst_ids].view(torch.uint8), sv[src_ids].view(torch.uint8))
               for (sk, sv), (dk, dv) in zip(src, dst, strict=True))


def _quiet(end, rid: str) -> threading.Event:
    quiet = threading.Event()
    end.when_quiet(rid, quiet.set)
    return quiet


def test_small_request_lands_byte_exact_as_one_message(pair):
    layout, src, dst, sender, receiver = pair
    receiver.expect("r", [9, 10, 11])
    before = sender.sends(receiver.address)
    sender.send("r", receiver.address, [2, 3, 4], [9, 10, 11], {"first_token_id": 7})
    assert sender.wait("r", 20) is TransferState.DONE, sender.table.get("r").reason
    assert receiver.wait("r", 10) is TransferState.DONE
    after = sender.sends(receiver.address)
    block_bytes = layout.block_size * layout.num_kv_heads * layout.head_dim * \
        layout.element_size
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2 * LAYERS * 3 * block_bytes)
    # Counted before the posts (the StreamEnd is out first, so the ack may beat them).
    assert sender.table.get("r").num_bytes == 2 * LAYERS * 3 * block_bytes
    assert _same(src, dst, [2, 3, 4], [9, 10, 11])
    assert receiver.table.get("r").extra == {"first_token_id": 7}
    assert _quiet(sender, "r").wait(5) and _quiet(receiver, "r").wait(5)


def test_reservation_aborted_before_the_data_drains_without_touching_blocks(pair):
    layout, src, dst, sender, receiver = pair
    before = [(k.clone(), v.clone()) for k, v in dst]
    receiver.expect("gone", [3, 4])
    receiver.abort("gone")
    sender.send("gone", receiver.address, [0, 1], [3, 4], {"first_token_id": 1})
    assert sender.wait("gone", 20) is TransferState.FAILED
    assert "no reservation" in sender.table.get("gone").reason
    assert _same(before, dst, list(range(16)), list(range(16)))  # no block written
    assert _quiet(sender, "gone").wait(5) and _quiet(receiver, "gone").wait(5)
    receiver.expect("after", [3, 4])
    sender.send("after", receiver.address, [5, 6], [3, 4], {"first_token_id": 2})
    assert sender.wait("after", 20) is TransferState.DONE, sender.table.get("after").reason
    assert _same(src, dst, [5, 6], [3, 4])


def test_abort_on_both_ends_right_after_the_send_lets_every_block_go(pair):
    """Aborted while its one message may still be in flight: whichever comes first, both
    ends let the blocks go once the posted operations end, and the pair goes on."""
    layout, src, dst, sender, receiver = pair
    receiver.expect("r", [0, 1, 2, 3])
    sender.send("r", receiver.address, [4, 5, 6, 7], [0, 1, 2, 3], {"first_token_id": 1})
    sender.abort("r")
    receiver.abort("r")
    quiet = (_quiet(sender, "r"), _quiet(receiver, "r"))
    assert sender.state("r") in (TransferState.ABORTED, TransferState.DONE)
    assert receiver.state("r") in (TransferState.ABORTED, TransferState.DONE)
    assert all(q.wait(10) for q in quiet), "blocks still pinned after the posts ended"
    receiver.expect("next", [8, 9])
    sender.send("next", receiver.address, [1, 2], [8, 9], {"first_token_id": 3})
    assert sender.wait("next", 20) is TransferState.DONE, sender.table.get("next").reason
    assert _same(src, dst, [1, 2], [8, 9])


def test_messages_for_no_pair_still_report_on_wire(pair):
    """`TorchPairs.command(on_wire=...)` is set once the messages are on the pair's socket
    or dropped (no such pair): a bounded wait on it never waits out its bound for nothing,
    and the pair goes on."""
    layout, src, dst, sender, receiver = pair
    event = threading.Event()
    sender._pairs.command("tcp://127.0.0.1:1", b"dropped", on_wire=event)
    assert event.wait(5)
    receiver.expect("after", [1])
    sender.send("after", receiver.address, [2], [1])
    assert sender.wait("after", 20) is TransferState.DONE
    assert _same(src, dst, [2], [1])


def test_block_runs_one_run_when_both_ends_are_contiguous_else_split_at_every_gap():
    assert block_runs(list(range(5, 1029)), list(range(100, 1124))) == [(5, 100, 1024)]
    assert block_runs([], []) == [] and block_runs([3], [7]) == [(3, 7, 1)]
    assert block_runs([1, 2, 4], [5, 6, 7]) == [(1, 5, 2), (4, 7, 1)]  # a gap at the source
    assert block_runs([1, 2, 3], [5, 6, 8]) == [(1, 5, 2), (3, 8, 1)]  # ... at the dest
    assert block_runs([2, 1, 3], [4, 5, 6]) == [(2, 4, 1), (1, 5, 1), (3, 6, 1)]
    with pytest.raises(ValueError):
        block_runs([1, 2], [1])
