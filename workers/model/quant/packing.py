"""4-bit packing: eight 4-bit values per int32, as GPTQ and AWQ checkpoints store them.

GPTQ packs eight consecutive elements in order (element j in bits 4j..4j+3): its qweight along
the input dimension, its qzeros along the output dimension. AWQ packs along the output
dimension in the interleaved order of its GEMM kernel: nibble i holds element AWQ_ORDER[i].
"""

from __future__ import annotations

import torch

SEQUENTIAL_ORDER = (0, 1, 2, 3, 4, 5, 6, 7)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble i of an AWQ word holds element AWQ_ORDER[i] of its eight."""
PACK = 8
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)


def pack_int4(values: torch.Tensor, dim: int, order: tuple[int, ...] = SEQUENTIAL_ORDER):
    """Integer values 0..15 -> int32 with `dim` shrunk 8 times; nibble i of a word holds
    element order[i] of its eight consecutive elements along `dim`."""
    if values.shape[dim] % PACK:
        raise ValueError(f"dimension {dim} of {list(values.shape)} is not a multiple of {PACK}")
    if values.numel() and (values.min() < 0 or values.max() > 15):
        raise ValueError("4-bit values must lie in 0..15")
    moved = values.movedim(dim, -1).to(torch.int64)
    eights = moved.reshape(*moved.shape[:-1], -1, PACK)[..., list(order)]
    words = (eights << _SHIFTS.to(values.device)).sum(-1)
    # Two's complement: a word with its top nibble >= 8 is a negative int32.
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim)


def unpack_int4(packed: torch.Tensor, dim: int, order: tuple[int, ...] = SEQUENTIAL_ORDER):
    """The inverse of `pack_int4`: int32 -> int32 values 0..15 with `dim` grown 8 times."""
    moved = packed.movedim(dim, -1).to(torch.int64)
    nibbles = (moved[..., None] >> _SHIFTS.to(packed.device)) & 0xF
    inverse = sorted(range(PACK), key=lambda i: order[i])
    values = nibbles[..., inverse].reshape(*moved.shape[:-1], -1)
    return values.to(torch.int32).movedim(-1, dim)
