"""Rank-to-rank plans between a prefill worker's ranks and a decode worker's, for prefill and
decode pools of different TP/PP shapes: every cell (layer x kv head) of every receiver rank
comes from exactly one sender rank, the bytes moved are the model's KV once per receiving
replica (never once per sending replica), and shapes that cannot work are refused by name."""

from __future__ import annotations

import pytest

from workers.errors import HandshakeMismatch
from workers.kv_transfer.layout import KVLayout, group_layouts, plan_group_transfers

MODEL = KVLayout("m", "bfloat16", 16, num_layers=4, num_kv_heads=4, head_dim=8)
GQA = KVLayout("m", "bfloat16", 16, num_layers=4, num_kv_heads=2, head_dim=8)


def cells_by_receiver(plans, receivers) -> dict[int, list[tuple[int, int]]]:
    """Each receiver rank's received cells, as (layer, head) with repeats kept."""
    got: dict[int, list[tuple[int, int]]] = {r: [] for r in range(len(receivers))}
    for rank_plan in plans:
        p = rank_plan.plan
        got[rank_plan.receiver_rank] += [(layer, head) for layer in range(p.layer_start,
                                                                          p.layer_end)
                                         for head in range(p.kv_head_start, p.kv_head_end)]
    return got


def assert_tiles(plans, senders, receivers) -> None:
    for r, cells in cells_by_receiver(plans, receivers).items():
        wanted = [(layer, head) for layer in receivers[r].layers
                  for head in receivers[r].kv_heads]
        assert sorted(cells) == sorted(wanted), f"receiver rank {r}"
    for rank_plan in plans:  # each plan lies inside both ranks' slices
        sender, receiver = senders[rank_plan.sender_rank], receivers[rank_plan.receiver_rank]
        p = rank_plan.plan
        for layout in (sender, receiver):
            assert p.layer_start in layout.layers and p.layer_end - 1 in layout.layers
            assert p.kv_head_start in layout.kv_heads and p.kv_head_end - 1 in layout.kv_heads


@pytest.mark.parametrize(("prefill", "decode", "pairs"), [
    ((2, 1), (1, 1), {(0, 0), (1, 0)}),                  # P TP2 -> D TP1: two head halves
    ((1, 1), (2, 1), {(0, 0), (0, 1)}),                  # P TP1 -> D TP2: one sender, split
    ((1, 2), (1, 1), {(0, 0), (1, 0)}),                  # P PP2 -> D PP1: two layer halves
    ((1, 2), (2, 1), {(0, 0), (0, 1), (1, 0), (1, 1)}),  # P TP1/PP2 -> D TP2/PP1
    ((2, 2), (2, 2), {(0, 0), (1, 1), (2, 2), (3, 3)}),  # same shape: rank to same rank
], ids=["tp2-to-tp1", "tp1-to-tp2", "pp2-to-pp1", "tp1pp2-to-tp2pp1", "tp2pp2-to-tp2pp2"])
def test_each_receiver_cell_comes_from_exactly_one_sender(prefill, decode, pairs):
    senders, receivers = group_layouts(MODEL, *prefill), group_layouts(MODEL, *decode)
    plans = plan_group_transfers(senders, receivers)
    assert {(p.sender_rank, p.receiver_rank) for p in plans} == pairs
    assert_tiles(plans, senders, receivers)
    moved = sum(p.plan.num_bytes(MODEL, num_blocks=3) for p in plans)
    assert moved == MODEL.num_layers * 4 * 2 * 3 * 16 * 8 * 2  # the model's KV, once


def test_gqa_heads_replicated_by_prefill_tp_are_sent_once():
    """2 kv heads over prefill TP 4: ranks 0-1 hold head 0, ranks 2-3 head 1; decode TP 1
    gets each head from its first holder only."""
    senders = group_layouts(GQA, 4, 1)
    assert [s.kv_heads for s in senders] == [range(0, 1)] * 2 + [range(1, 2)] * 2
    plans = plan_group_transfers(senders, group_layouts(GQA, 1, 1))
    assert [(p.sender_rank, p.plan.kv_head_start) for p in plans] == [(0, 0), (2, 1)]
    assert_tiles(plans, senders, group_layouts(GQA, 1, 1))


def test_gqa_heads_replicated_by_decode_tp_reach_every_replica():
    """Decode TP 4 over 2 kv heads: each receiving replica needs its own copy, sent once."""
    receivers = group_layouts(GQA, 4, 1)
    plans = plan_group_transfers(group_layouts(GQA, 2, 1), receivers)
    assert sorted((p.sender_rank, p.receiver_rank) for p in plans) == \
        [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert_tiles(plans, group_layouts(GQA, 2, 1), receivers)


def test_shapes_that_cannot_work_are_refused_by_name():
    other = KVLayout("m", "bfloat16", 16, num_layers=4, num_kv_heads=4, head_dim=16)
    with pytest.raises(HandshakeMismatch, match="'head_dim'"):
        plan_group_transfers(group_layouts(MODEL, 2, 1), group_layouts(other, 1, 1))
    # A prefill worker missing a stage (a rank's slice nobody sends) cannot feed decode.
    with pytest.raises(HandshakeMismatch, match="'kv slices'.*8 of receiver rank 0's cells"):
        plan_group_transfers(group_layouts(MODEL, 1, 2)[:1], group_layouts(MODEL, 1, 1))
    with pytest.raises(ValueError, match="cannot give part"):
        group_layouts(GQA, 3, 1)  # 2 kv heads cannot be replicated evenly over 3 ranks
