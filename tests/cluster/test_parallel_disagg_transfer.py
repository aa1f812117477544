"""KV transfer between a prefill worker's ranks and a decode worker's ranks of different TP/PP
shapes, over real gloo pairs, one TorchSender per prefill rank and one Receiver per decode
rank (what each rank actor of the two workers holds).

Proves: every decode rank ends with exactly its slice of the prefill KV, bit-exact, in its
reserved blocks; each (prefill rank, decode rank) pair moved exactly the bytes of its planned
intersection, and no other pair moved any (a kv head replicated over prefill TP ranks is sent
once, by its first holder); the group address names every decode rank in rank order. And,
through the drivers' group ends and their follower ranks (the commands that ride in the step
broadcast delivered in process): a transfer is landed only once every decode rank's slice
has, and one rank's failure fails it on both workers and lets every block go.
"""

from __future__ import annotations

import threading

import pytest
import torch

from workers.actors.kv_endpoint import transfer_config
from workers.kv_transfer import KVLayout, Receiver, TorchSender, TransferConfig, TransferState
from workers.kv_transfer.layout import plan_group_transfers
from workers.kv_transfer.rank_driver import GroupReceiver, GroupSender
from workers.kv_transfer.rank_follower import RankFollower
from workers.kv_transfer.rank_routes import GroupAddress, RankShape, routes
from workers.kv_transfer.stream_plan import PrefillSpan

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


class _Steps:
    """The driver's step broadcast, in process: commands reach every follower rank in order
    (the rank actors get them from the gloo broadcast; the rest of the path is the same)."""

    def __init__(self, followers: list[RankFollower]):
        self.followers = followers
        self._attached: list[bytes] = []

    def post(self, side: list[bytes]) -> None:
        for follower in self.followers:
            follower.handle(side)

    def attach(self, side: list[bytes]) -> None:
        self._attached += side

    def run_step(self, driver: GroupSender, num_layers: int) -> None:
        """What every rank does for one prefill step: the step's commands, then each layer's
        sends as its layer ends (all layers are on every rank: TP only)."""
        side, self._attached = self._attached, []
        self.post(side)
        for layer in range(num_layers):
            driver.layer_done(layer)
            for follower in self.followers:
                follower.layer_hook(layer)


def _group(role: str, layouts, caches, outcomes: dict):
    """The driver's end (rank 0) and its followers (ranks 1..), wired in process."""
    followers = [RankFollower(rank, layout, RankShape(len(layouts)), _slice(caches, layout),
                              transfer_config) for rank, layout in enumerate(layouts) if rank]
    steps = _Steps(followers)
    cls = GroupSender if role == "prefill" else GroupReceiver
    end = cls(layouts[0], _slice(caches, layouts[0]), CONFIG, RankShape(len(layouts)), steps,
              lambda fn: fn(), "gloo",
              on_done=lambda rid, extra: outcomes.setdefault(role, ("done", extra)),
              on_failed=lambda rid, state, why: outcomes.setdefault(role, (state.value, why)))
    return end, followers, steps


def _quiet(end, rid: str) -> threading.Event:
    quiet = threading.Event()
    end.when_quiet(rid, quiet.set)
    return quiet


@pytest.mark.parametrize("fail_rank", [None, 1], ids=["all-ranks-land", "decode-rank-1-fails"])
def test_driver_ends_count_a_transfer_landed_only_when_every_rank_has(fail_rank):
    """P TP2 -> D TP2 through the drivers' group ends and their follower ranks: DONE (with
    token 1's extra) only once both decode ranks have their slice; one decode rank's failure
    fails the transfer on both workers, aborts every rank, and every block goes quiet."""
    whole = KVLayout("tiny", "float32", block_size=4, num_layers=2, num_kv_heads=2,
                     head_dim=8)
    shape = (16, whole.block_size, 2, whole.head_dim)
    gen = torch.Generator().manual_seed(4)
    source = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
              for _ in range(2)]
    zeros = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(2)]
    layouts = RankShape(2).layouts(whole)
    outcomes: dict = {}
    receiver, decode_ranks, _ = _group("decode", layouts, zeros, outcomes)
    sender, prefill_ranks, steps = _group("prefill", layouts, source, outcomes)
    try:
        assert GroupAddress.parse(receiver.address).addresses[1] == decode_ranks[0].end.address
        receiver.expect("r", DST_IDS)
        sender.open("r", receiver.address, DST_IDS, NUM_TOKENS)
        if fail_rank is not None:
            decode_ranks[fail_rank - 1].end.abort("r")
        for start, end in ((0, 6), (6, NUM_TOKENS)):  # chunked prefill: two steps
            sender.before_step([PrefillSpan("r", start, end, SRC_IDS)])
            steps.run_step(sender, whole.num_layers)
        sender.finish("r", extra={"first_token_id": 7})
        quiet = [_quiet(sender, "r"), _quiet(receiver, "r")]
        if fail_rank is None:
            assert receiver.wait("r", 30) is TransferState.DONE, receiver.table.get("r").reason
            assert sender.wait("r", 30) is TransferState.DONE, sender.table.get("r").reason
            assert outcomes["decode"] == ("done", {"first_token_id": 7})
            for layout, end in zip(layouts, [receiver.local, *(r.end for r in decode_ranks)],
                                   strict=True):
                for (k, v), (sk, sv) in zip(end.kv_caches, _slice(source, layout),
                                            strict=True):
                    assert torch.equal(k[DST_IDS], sk[SRC_IDS])
                    assert torch.equal(v[DST_IDS], sv[SRC_IDS])
        else:
            assert receiver.wait("r", 30) is TransferState.FAILED
            assert outcomes["decode"][0] == "failed" and "rank 1" in outcomes["decode"][1]
            assert sender.wait("r", 30) is TransferState.FAILED
            for rank in decode_ranks + prefill_ranks:
                assert rank.end.wait("r", 30).terminal
        assert all(event.wait(30) for event in quiet)
    finally:
        for end in (sender, receiver):
            end.close()
        for rank in prefill_ranks + decode_ranks:
            rank.close()
