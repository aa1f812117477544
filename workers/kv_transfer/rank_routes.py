"""Where each rank of a prefill worker sends a request's KV when the decode worker has several
ranks (or the prefill worker has): the decode worker's group address and the routes it gives.

A decode worker of tp x pp ranks has one KV receiver per rank. Its address, as the router
passes it around (Reservation.kv_address, connect), is a group address: its shape and every
rank's receiver address in rank order, `ranks:TPxPP:tcp://h:p0,tcp://h:p1,...`. A plain
`tcp://h:p` address is a group of one. Each prefill rank works out its own routes from it
(plan_group_transfers on both groups' slices), so every rank agrees without being told.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from workers.kv_transfer.layout import KVLayout, group_layouts, plan_group_transfers

_PREFIX = "ranks:"


@dataclass(frozen=True)
class GroupAddress:
    """A decode worker's KV receivers: `addresses[rank]`, rank = pp_rank * tp + tp_rank."""

    tp: int
    pp: int
    addresses: tuple[str, ...]

    def encode(self) -> str:
        if self.tp * self.pp == 1:
            return self.addresses[0]
        return f"{_PREFIX}{self.tp}x{self.pp}:{','.join(self.addresses)}"

    @classmethod
    def parse(cls, address: str) -> GroupAddress:
        if not address.startswith(_PREFIX):
            return cls(1, 1, (address,))
        shape, addresses = address[len(_PREFIX):].split(":", 1)
        tp, pp = (int(n) for n in shape.split("x"))
        group = cls(tp, pp, tuple(addresses.split(",")))
        if len(group.addresses) != tp * pp:
            raise ValueError(f"{address!r}: {len(group.addresses)} addresses for tp {tp} x "
                             f"pp {pp}")
        return group


def whole_model(layout: KVLayout) -> KVLayout:
    """The layout of the whole model that `layout` is one rank's slice of."""
    return replace(layout, layer_start=0, layer_end=None, kv_head_start=0, kv_head_end=None)


@dataclass(frozen=True)
class RankShape:
    """A worker's shape: the slices of all its ranks follow from one rank's layout."""

    tp: int = 1
    pp: int = 1

    def layouts(self, layout: KVLayout) -> list[KVLayout]:
        return group_layouts(whole_model(layout), self.tp, self.pp)


SINGLE_RANK = RankShape()


def routes(layout: KVLayout, shape: RankShape, dest: str) -> dict[int, list[str]]:
    """Prefill rank -> the decode ranks' addresses it sends to (ranks that send nothing, e.g.
    a second holder of a replicated kv head, are absent). Raises HandshakeMismatch where the
    two groups' slices cannot work together."""
    group = GroupAddress.parse(dest)
    senders = shape.layouts(layout)
    receivers = RankShape(group.tp, group.pp).layouts(layout)
    plans = plan_group_transfers(senders, receivers)
    out: dict[int, list[str]] = {}
    for plan in plans:
        out.setdefault(plan.sender_rank, []).append(group.addresses[plan.receiver_rank])
    return out
