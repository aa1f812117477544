"""KV transfer between a prefill worker's ranks and a decode worker's ranks of different TP/PP
shapes, over real gloo pairs, one TorchSender per prefill rank and one Receiver per decode
rank (what each rank actor of the two workers holds).

Proves: every decode rank ends with exactly its slice of the prefill KV, bit-exact, in its
reserved blocks; each (prefill rank, decode rank) pair moved exactly the bytes of its planned
intersection, and no other pair moved any (a kv head replicated over prefill TP ranks is sent
once, by its first holder); the group address names every decode rank in rank order.
"""

from __future__ import annotations

import pytest
import torch

from workers.kv_transfer import KVLayout, Receiver, TorchSender, TransferConfig, TransferState
from workers.kv_transfer.layout import plan_group_transfers
from workers.kv_transfer.rank_routes import GroupAddress, RankShape, routes

CONFIG = TransferConfig(probe_bytes=1 << 12, timeout_s=20)
SRC_IDS = [4, 9, 10, 2]
DST_IDS = [7, 1, 12, 13]
NUM_TOKENS = 14  # 4 blocks of 4, the last one partly filled


def _slice(caches, layout: KVLayout):
    return [(k[:, :, layout.kv_head_start:layout.kv_head_end].clone(),
             v[:, :, layout.kv_head_start:layout.kv_head_end].clone())
            for k, v in caches[layout.layer_start:layout.layer_end]]


SHAPES = {
    "p-tp2-to-d-tp1": (2, (2, 1), (1, 1)),
    "p-tp1-to-d-tp2": (2, (1, 1), (2, 1)),
    "p-pp2-to-d-pp1": (2, (1, 2), (1, 1)),
    "p-tp1pp2-to-d-tp2pp1": (2, (1, 2), (2, 1)),
    "p-tp2-to-d-tp2": (2, (2, 1), (2, 1)),
    "gqa-p-tp2-to-d-tp1": (1, (2, 1), (1, 1)),
    "gqa-p-tp1-to-d-tp2": (1, (1, 1), (2, 1)),
    "gqa-p-tp2pp2-to-d-tp2": (1, (2, 2), (2, 1)),
}


@pytest.mark.parametrize("kv_heads,prefill,decode", SHAPES.values(), ids=SHAPES.keys())
def test_each_rank_pair_moves_exactly_its_planned_intersection(kv_heads, prefill, decode):
    whole = KVLayout("tiny", "float32", block_size=4, num_layers=4, num_kv_heads=kv_heads,
                     head_dim=8)
    gen = torch.Generator().manual_seed(3)
    shape = (16, whole.block_size, kv_heads, whole.head_dim)
    source = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
              for _ in range(whole.num_layers)]
    send_layouts = RankShape(*prefill).layouts(whole)
    recv_layouts = RankShape(*decode).layouts(whole)
    receivers = [Receiver(layout, _slice([(torch.zeros(shape), torch.zeros(shape))] *
                                         whole.num_layers, layout), CONFIG)
                 for layout in recv_layouts]
    senders = [TorchSender(layout, _slice(source, layout), CONFIG, shape=RankShape(*prefill),
                           rank=rank) for rank, layout in enumerate(send_layouts)]
    try:
        group = GroupAddress(*decode, tuple(r.address for r in receivers)).encode()
        assert GroupAddress.parse(group).addresses == tuple(r.address for r in receivers)
        for receiver in receivers:
            receiver.expect("r", DST_IDS)
        for sender in senders:
            sender.send("r", group, SRC_IDS, DST_IDS, {"first_token_id": 5}, NUM_TOKENS)
        for receiver in receivers:
            assert receiver.wait("r", 30) is TransferState.DONE, receiver.table.get("r").reason
            assert receiver.table.get("r").extra["first_token_id"] == 5
        for layout, receiver in zip(recv_layouts, receivers, strict=True):
            for (k, v), (sk, sv) in zip(receiver.kv_caches, _slice(source, layout),
                                        strict=True):
                assert torch.equal(k[DST_IDS], sk[SRC_IDS]) and torch.equal(v[DST_IDS],
                                                                           sv[SRC_IDS])
        planned: dict[tuple[int, str], int] = {}
        for plan in plan_group_transfers(send_layouts, recv_layouts):
            key = (plan.sender_rank, receivers[plan.receiver_rank].address)
            planned[key] = plan.plan.num_bytes(whole, len(DST_IDS))
        moved = {}
        for rank, sender in enumerate(senders):
            record = sender.table.get("r")
            if record is None:  # a replica of heads another rank sends: it sends nothing
                assert routes(whole, RankShape(*prefill), group).get(rank) is None
                continue
            assert sender.wait("r", 30) is TransferState.DONE, record.reason
            moved |= {(rank, dest): n for dest, n in record.peer_bytes.items()}
        assert moved == planned
        cells = sum(len(r.layers) * len(r.kv_heads) for r in recv_layouts)
        bytes_per_cell = 2 * len(DST_IDS) * whole.block_size * whole.head_dim * 4
        assert sum(moved.values()) == cells * bytes_per_cell  # each cell sent exactly once
    finally:
        for end in (*senders, *receivers):
            end.close()


def test_a_plain_address_is_a_group_of_one_and_shapes_that_cannot_work_are_named():
    assert GroupAddress.parse("tcp://h:1") == GroupAddress(1, 1, ("tcp://h:1",))
    assert GroupAddress(1, 1, ("tcp://h:1",)).encode() == "tcp://h:1"
    with pytest.raises(ValueError, match="3 addresses"):
        GroupAddress.parse("ranks:2x1:tcp://a:1,tcp://a:2,tcp://a:3")
