"""What one rank's KV cache looks like, and which part of it a transfer moves.

A rank owns a slice of (layers x kv heads) of the model's KV cache, given by its pipeline stage
(layers) and tensor-parallel rank (kv heads). A transfer between a sender rank and a receiver
rank moves the intersection of their slices, so prefill TP=2 feeding decode TP=1 (or PP=2
feeding PP=1) is just several transfers whose plans tile the receiver's slice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import metadata

from workers.errors import HandshakeMismatch


def kvrelay_version() -> str:
    """The installed kvrelay distribution's version (the wire format changes with it)."""
    try:
        return metadata.version("kvrelay")
    except metadata.PackageNotFoundError:
        return "0.0.0+source"


@dataclass(frozen=True)
class KVLayout:
    """One rank's KV cache: `kv_caches[i]` holds layer `layer_start + i`, each K and V tensor
    `[num_blocks, block_size, kv_head_end - kv_head_start, head_dim]` (only owned heads)."""

    model: str
    dtype: str
    """torch dtype name without the 'torch.' prefix, e.g. 'bfloat16'."""
    block_size: int
    num_layers: int
    """Layers of the whole model."""
    num_kv_heads: int
    """KV heads of the whole model."""
    head_dim: int
    layer_start: int = 0
    layer_end: int | None = None
    """Exclusive; None: num_layers."""
    kv_head_start: int = 0
    kv_head_end: int | None = None
    """Exclusive; None: num_kv_heads."""
    version: str = ""
    """kvrelay version; '' means this process's `kvrelay_version()`."""
    kv_scales: tuple[tuple[int, float, float], ...] = ()
    """fp8 caches: (layer, k_scale, v_scale) of each owned layer (global index), the scales
    the cache holds values divided by (workers/model/kv_scales.py); () when not given (not
    compared). Two ends that both give them must agree on every layer they share."""

    def __post_init__(self) -> None:
        # Normalized once so two layouts compare field by field (the wire gives lists).
        object.__setattr__(self, "kv_scales", tuple(
            (int(layer), float(k), float(v)) for layer, k, v in self.kv_scales))
        if self.layer_end is None:
            object.__setattr__(self, "layer_end", self.num_layers)
        if self.kv_head_end is None:
            object.__setattr__(self, "kv_head_end", self.num_kv_heads)
        if not self.version:
            object.__setattr__(self, "version", kvrelay_version())
        if not 0 <= self.layer_start < self.layer_end <= self.num_layers:
            raise ValueError(f"layers [{self.layer_start}, {self.layer_end}) outside "
                             f"[0, {self.num_layers})")
        if not 0 <= self.kv_head_start < self.kv_head_end <= self.num_kv_heads:
            raise ValueError(f"kv heads [{self.kv_head_start}, {self.kv_head_end}) outside "
                             f"[0, {self.num_kv_heads})")

    @property
    def layers(self) -> range:
        return range(self.layer_start, self.layer_end)

    @property
    def kv_heads(self) -> range:
        return range(self.kv_head_start, self.kv_head_end)

    @property
    def element_size(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    def to_dict(self) -> dict:
        """Plain fields, as they come back off the wire (kv_scales as lists)."""
        return {**asdict(self), "kv_scales": [list(s) for s in self.kv_scales]}

    @classmethod
    def from_dict(cls, fields: dict) -> KVLayout:
        return cls(**fields)


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}

# Fields both ends of a pair must agree on, in the order a mismatch is reported.
_HANDSHAKE_FIELDS = ("version", "model", "dtype", "block_size", "num_layers", "num_kv_heads",
                     "head_dim")


def check_compatible(local: KVLayout, remote: KVLayout) -> None:
    """Raises `HandshakeMismatch` naming the first field on which the two ends differ.

    The owned slices may differ (that is what the plan is for); everything that fixes the byte
    layout of one block of one (layer, head), or what its bytes mean (fp8 KV scales), may not.
    """
    for name in _HANDSHAKE_FIELDS:
        mine, theirs = getattr(local, name), getattr(remote, name)
        if mine != theirs:
            raise HandshakeMismatch(name, mine, theirs)
    _check_scales(local, remote)


def _check_scales(local: KVLayout, remote: KVLayout) -> None:
    """Raises `HandshakeMismatch('kv_scales', ...)` naming the first shared layer whose K or
    V scale differs: the receiver would read the sender's fp8 values with other scales."""
    theirs = {layer: (k, v) for layer, k, v in remote.kv_scales}
    for layer, k, v in sorted(local.kv_scales):
        if layer in theirs and theirs[layer] != (k, v):
            raise HandshakeMismatch("kv_scales", _scale_text(layer, k, v),
                                    _scale_text(layer, *theirs[layer]))


def _scale_text(layer: int, k: float, v: float) -> str:
    return f"layer {layer}: k_scale {k!r}, v_scale {v!r}"


@dataclass(frozen=True)
class TransferPlan:
    """The (layers x kv heads) a sender moves to a receiver, in global indices.

    Local offsets into each side's `kv_caches` / head axis come from `sender_*` and
    `receiver_*` helpers, so pack and unpack never repeat the arithmetic.
    """

    layer_start: int
    layer_end: int
    kv_head_start: int
    kv_head_end: int

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def num_kv_heads(self) -> int:
        return self.kv_head_end - self.kv_head_start

    @property
    def num_cells(self) -> int:
        """(layer, kv head) pairs covered; the receiver counts these to know when it is done."""
        return self.num_layers * self.num_kv_heads

    def local_layers(self, layout: KVLayout) -> range:
        """Indices into `layout`'s kv_caches list."""
        return range(self.layer_start - layout.layer_start, self.layer_end - layout.layer_start)

    def local_heads(self, layout: KVLayout) -> slice:
        """Slice of `layout`'s kv-head axis."""
        return slice(self.kv_head_start - layout.kv_head_start,
                     self.kv_head_end - layout.kv_head_start)

    def num_bytes(self, layout: KVLayout, num_blocks: int) -> int:
        """Bytes of the packed buffer: K and V of every planned layer and head."""
        per_block = layout.block_size * self.num_kv_heads * layout.head_dim
        return 2 * self.num_layers * num_blocks * per_block * layout.element_size


def plan_transfer(sender: KVLayout, receiver: KVLayout) -> TransferPlan | None:
    """The intersection of the two ranks' slices; None when they share no (layer, head)."""
    layer_start = max(sender.layer_start, receiver.layer_start)
    layer_end = min(sender.layer_end, receiver.layer_end)
    head_start = max(sender.kv_head_start, receiver.kv_head_start)
    head_end = min(sender.kv_head_end, receiver.kv_head_end)
    if layer_start >= layer_end or head_start >= head_end:
        return None
    return TransferPlan(layer_start, layer_end, head_start, head_end)


def slice_for_rank(layout: KVLayout, tp_rank: int, tp_size: int, pp_rank: int = 0,
                   pp_size: int = 1) -> KVLayout:
    """The copy of a whole-model layout owned by one (tp, pp) rank: contiguous kv-head and layer
    ranges, split as evenly as possible (earlier ranks take the remainder)."""
    heads = _split(layout.num_kv_heads, tp_size, tp_rank)
    layers = _split(layout.num_layers, pp_size, pp_rank)
    scales = tuple(s for s in layout.kv_scales if s[0] in layers)
    return KVLayout(layout.model, layout.dtype, layout.block_size, layout.num_layers,
                    layout.num_kv_heads, layout.head_dim, layers.start, layers.stop,
                    heads.start, heads.stop, layout.version, scales)


def _split(total: int, parts: int, index: int) -> range:
    """Part `index` of `parts` contiguous parts of `total` items; with more parts than items
    (kv heads < TP ranks) each item is replicated on parts // total consecutive parts."""
    if not 0 <= index < parts or (parts > total and parts % total):
        raise ValueError(f"cannot give part {index} of {parts} of {total} items")
    if parts > total:
        item = index * total // parts
        return range(item, item + 1)
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


@dataclass(frozen=True)
class RankPlan:
    """One (sender rank, receiver rank) pair of two worker groups and what it moves."""

    sender_rank: int
    receiver_rank: int
    plan: TransferPlan


def group_layouts(layout: KVLayout, tp_size: int, pp_size: int) -> list[KVLayout]:
    """The slices of a tp_size x pp_size worker, in rank order (pp_rank * tp_size + tp_rank,
    as workers/model/parallel.py numbers them)."""
    return [slice_for_rank(layout, rank % tp_size, tp_size, rank // tp_size, pp_size)
            for rank in range(tp_size * pp_size)]


def plan_group_transfers(senders: list[KVLayout], receivers: list[KVLayout]) -> list[RankPlan]:
    """Rank-to-rank plans between a prefill worker's ranks and a decode worker's: every
    (layer, kv head) a receiver rank holds comes from exactly one sender rank, straight into
    the receiver's own slice (no gather onto one rank). A slice held by several sender ranks
    (kv heads replicated where prefill TP exceeds them) goes from its first holder only, once
    per receiver rank that holds it.

    Raises HandshakeMismatch naming the first field on which some pair disagrees, or
    'kv slices' when a receiver's slice is not tiled by the senders' (shapes that cannot
    work)."""
    for sender in senders:
        for receiver in receivers:
            check_compatible(sender, receiver)
    plans = []
    for r, receiver in enumerate(receivers):
        seen: set[tuple[range, range]] = set()
        cells = 0
        for s, sender in enumerate(senders):
            plan = plan_transfer(sender, receiver)
            if plan is None or (sender.layers, sender.kv_heads) in seen:
                continue
            seen.add((sender.layers, sender.kv_heads))
            plans.append(RankPlan(s, r, plan))
            cells += plan.num_cells
        wanted = len(receiver.layers) * len(receiver.kv_heads)
        if cells != wanted:
            raise HandshakeMismatch("kv slices", f"{cells} of receiver rank {r}'s cells sent",
                                    f"{wanted} held")
    return plans
