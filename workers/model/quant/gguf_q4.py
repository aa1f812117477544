"""GGUF Q4_0 / Q4_1 projections kept 4-bit: their blocks rearranged into the W4A16 layout
(workers/model/quant/int4_weight.py) instead of dequantized at load.

A GGUF [N, K] tensor stores each row as blocks of 32 input values (workers/model/gguf_blocks.py):
Q4_0 is d (float16) and 16 bytes of nibbles, y = d * (q - 8): groups of 32 with scale d and
zero point 8. Q4_1 adds m (float16), y = d * q + m: the layout's min form. Low nibbles are
values 0..15 of the block, high nibbles 16..31. The values, not just the layout, are the
file's: dequantizing the result equals the GGUF dequantization exactly (float32).
"""

from __future__ import annotations

import numpy as np
import torch

from workers.model.gguf_file import GGUFFile
from workers.model.gguf_loader import gguf_name, rotary_heads, unpermute_rotary
from workers.model.quant.int4_weight import Int4Weight

KEPT_FORMATS = ("Q4_0", "Q4_1")
BLOCK = 32


def is_kept_quantized(gguf: GGUFFile, hf_name: str) -> bool:
    """Whether the tensor of a Hugging Face name is stored in a format kept quantized."""
    return gguf.tensors[gguf_name(hf_name)].format in KEPT_FORMATS


def read_gguf_q4(gguf: GGUFFile, hf_name: str) -> Int4Weight:
    """The Q4_0 / Q4_1 tensor of a projection as an Int4Weight, rows in Hugging Face order."""
    fmt, raw = gguf.blocks(gguf_name(hf_name))  # [N, K / 32, block_bytes]
    min_form = fmt.name == "Q4_1"
    first_nibble = 4 if min_form else 2
    scales = _f16_field(raw, 0)
    packed = raw[:, :, first_nibble:]
    values = np.concatenate([packed & 0x0F, packed >> 4], axis=2).reshape(raw.shape[0], -1)
    values = torch.from_numpy(values.astype(np.int32))
    zeros = _f16_field(raw, 2) if min_form else torch.full_like(scales, 8)
    heads = rotary_heads(gguf, hf_name)
    if heads is not None:
        values, scales, zeros = (unpermute_rotary(t, heads) for t in (values, scales, zeros))
    return Int4Weight.from_values(values.T, scales.T, zeros.T, BLOCK, min_form=min_form)


def _f16_field(raw: np.ndarray, start: int) -> torch.Tensor:
    """The float16 at byte `start` of every block: [N, K / 32]."""
    field = np.ascontiguousarray(raw[:, :, start : start + 2]).view(np.float16)[..., 0]
    return torch.from_numpy(field.copy())
