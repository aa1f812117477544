"""Tensor-parallel linear layers and embeddings (the gpt-fast / Megatron split).

Each layer holds only this TP rank's shard and knows how to cut its shard out of a full
checkpoint tensor (`load`). With tp_size == 1 they are plain nn.Linear / nn.Embedding.
- ColumnParallelLinear: output features split across ranks; no communication. Several
  projections may be merged into one matmul (q/k/v, gate/up): `output_sizes` lists them.
- RowParallelLinear: input features split; one all-reduce of the output.
- VocabParallelEmbedding / ParallelLMHead: vocab rows split; the embedding all-reduces,
  the head all-gathers logits.

The two projection layers may instead hold their weight quantized (GPTQ/AWQ 4-bit, INT8,
FP8; workers/model/quant/): `load_quantized(shard, weight)` takes a full (unsharded) quantized
weight, keeps this rank's shard, and once every merged shard has arrived replaces the dense
`weight` parameter (set to None) by `quantized`, a module computing x @ W.T.

At decode sizes a quantized projection can also finish the RMSNorm between it and the next
one (kernels/norm_handoff.py `AddNorm`, `NormedRows`): RowParallelLinear.forward(x,
add_norm=...) adds the residual and hands the next ColumnParallelLinear a NormedRows, which
its forward takes in place of x. `hands_norm(rows)` / `takes_normed(rows)` say where.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.norm_handoff import AddNorm, NormedRows
from workers.model.parallel import ParallelContext

QuantizedWeight = nn.Module
"""Int4Weight, Int8Weight or Fp8Weight (workers/model/quant/): forward(x, gated=False,
add_norm=None) = x @ W.T, `fuses_activation`, `takes_norm(rows)`, and out_slice / in_slice /
cat_out to cut and merge shards."""


def _copy_shard(dst: torch.Tensor, full: torch.Tensor, dim: int, start: int) -> None:
    """Copies full[start : start + dst.shape[dim]] along `dim` into dst (clipped at the end of
    `full`, for vocab padding)."""
    length = min(dst.shape[dim], max(full.shape[dim] - start, 0))
    dst.narrow(dim, 0, length).copy_(full.narrow(dim, start, length))


class ColumnParallelLinear(nn.Module):
    def __init__(
        self, in_features: int, output_sizes: list[int], bias: bool, parallel: ParallelContext,
        local_rows: list[tuple[int, int]] | None = None,
    ):
        """`local_rows`: (first row, rows) of each merged output this rank holds; default an
        even split (replicated KV heads, where TP exceeds them, pass their own)."""
        super().__init__()
        self.parallel = parallel
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        if local_rows is None:
            local_rows = [(parallel.tp_rank * parallel.shard(size), parallel.shard(size))
                          for size in output_sizes]
        self.row_starts = [start for start, _ in local_rows]
        self.local_sizes = [size for _, size in local_rows]
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(self.local_sizes))) if bias else None
        self.quantized: QuantizedWeight | None = None
        self._quantized_shards: dict[int, QuantizedWeight] = {}

    def full_shape(self, param_name: str, shard: int) -> tuple[int, ...]:
        """Shape of the checkpoint tensor that fills merged output `shard` of a parameter."""
        rows = self.output_sizes[shard]
        return (rows, self.in_features) if param_name == "weight" else (rows,)

    def load(self, param_name: str, shard: int, full: torch.Tensor) -> None:
        local = self.local_sizes[shard]
        offset = sum(self.local_sizes[:shard])
        dst = getattr(self, param_name).data.narrow(0, offset, local)
        _copy_shard(dst, full, 0, self.row_starts[shard])

    def load_quantized(self, shard: int, full: QuantizedWeight) -> None:
        local = self.local_sizes[shard]
        self._quantized_shards[shard] = full.out_slice(self.row_starts[shard], local)
        if len(self._quantized_shards) == len(self.output_sizes):
            parts = [self._quantized_shards.pop(i) for i in range(len(self.output_sizes))]
            _install_quantized(self, type(parts[0]).cat_out(parts))

    def takes_normed(self, rows: int) -> bool:
        """Whether forward takes a NormedRows of `rows` rows (a quantized weight's
        matrix-vector kernel)."""
        return self.quantized is not None and self.quantized.takes_norm(rows)

    def forward(self, x: torch.Tensor | NormedRows) -> torch.Tensor:
        if self.quantized is None:
            return F.linear(x, self.weight, self.bias)
        y = self.quantized(x)
        return y if self.bias is None else y + self.bias


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: ParallelContext):
        super().__init__()
        self.parallel = parallel
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, parallel.shard(in_features)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.quantized: QuantizedWeight | None = None

    def full_shape(self, param_name: str, shard: int) -> tuple[int, ...]:
        out = self.out_features
        return (out, self.in_features) if param_name == "weight" else (out,)

    def load(self, param_name: str, shard: int, full: torch.Tensor) -> None:
        if param_name == "bias":
            self.bias.data.copy_(full)
            return
        local = self.weight.shape[1]
        _copy_shard(self.weight.data, full, 1, self.parallel.tp_rank * local)

    def load_quantized(self, shard: int, full: QuantizedWeight) -> None:
        local = self.parallel.shard(self.in_features)
        _install_quantized(self, full.in_slice(self.parallel.tp_rank * local, local))

    @property
    def fuses_activation(self) -> bool:
        """Whether forward(x, gated=True) takes an MLP's gate/up output and applies
        silu(gate) * up inside the matmul (4-bit weights' matrix-vector kernel: no activation
        launch at decode; the weight class decides, see its `fuses_activation`); dense weights
        go through cuBLAS, which has no prologue."""
        return self.quantized is not None and self.quantized.fuses_activation

    def hands_norm(self, rows: int) -> bool:
        """Whether forward takes `add_norm` for `rows` rows: a quantized weight's
        matrix-vector kernel owning whole output rows (no TP sum, no bias after it)."""
        return (self.parallel.tp_size == 1 and self.bias is None
                and self.quantized is not None and self.quantized.takes_norm(rows))

    def forward(
        self, x: torch.Tensor, gated: bool = False, add_norm: AddNorm | None = None,
    ) -> torch.Tensor | tuple[NormedRows, torch.Tensor]:
        """x @ W.T on this rank's input shard, summed over TP ranks; `gated` only where
        `fuses_activation`. With `add_norm` (only where `hands_norm`): (the next projection's
        NormedRows, the new residual stream) (kernels/norm_handoff.py)."""
        if add_norm is not None:
            return self.quantized(x, gated=gated, add_norm=add_norm)
        if self.quantized is None:
            assert not gated, "a dense weight takes no gated input"
            matmul = F.linear(x, self.weight)
        else:
            matmul = self.quantized(x, gated=gated)
        y = self.parallel.tp_all_reduce(matmul)
        # Bias once, after the sum, so TP ranks do not add it tp_size times.
        return y if self.bias is None else y + self.bias


def _install_quantized(layer: nn.Module, weight: QuantizedWeight) -> None:
    """The layer's matmul becomes `weight`'s, on the device of the dense weight it frees."""
    layer.quantized = weight.to(layer.weight.device)
    layer.weight = None


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext):
        super().__init__()
        self.parallel = parallel
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        padded = -(-vocab_size // parallel.tp_size) * parallel.tp_size
        self.local_vocab = padded // parallel.tp_size
        self.vocab_start = parallel.tp_rank * self.local_vocab
        self.weight = nn.Parameter(torch.zeros(self.local_vocab, hidden_size))

    def full_shape(self, param_name: str, shard: int) -> tuple[int, ...]:
        return (self.vocab_size, self.hidden_size)

    def load(self, param_name: str, shard: int, full: torch.Tensor) -> None:
        _copy_shard(self.weight.data, full, 0, self.vocab_start)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.local_vocab)
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.parallel.tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-parallel output projection; may share its weight with the embedding (tied), or
    hold it quantized (untied only)."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext):
        super().__init__(vocab_size, hidden_size, parallel)
        self.quantized: QuantizedWeight | None = None

    def load_quantized(self, shard: int, full: QuantizedWeight) -> None:
        """Keeps vocab rows [vocab_start, vocab_start + local_vocab) of the full quantized head
        (fewer on the last rank when TP does not divide the vocabulary: its logits are padded
        back to local_vocab, as the dense head's zero rows give)."""
        rows = min(self.local_vocab, self.vocab_size - self.vocab_start)
        _install_quantized(self, full.out_slice(self.vocab_start, rows))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocab float32 logits on every TP rank."""
        logits = self.parallel.tp_all_gather_last_dim(self.local_logits(hidden))
        return logits[..., : self.vocab_size].float()

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's local_vocab columns of the logits, in hidden's dtype."""
        if self.quantized is None:
            return F.linear(hidden, self.weight)
        local = self.quantized(hidden)
        missing = self.local_vocab - local.shape[-1]
        return F.pad(local, (0, missing)) if missing else local
