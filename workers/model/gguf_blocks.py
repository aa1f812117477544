"""GGUF block formats (ggml tensor types) and their dequantization to float32.

A GGUF tensor's rows are runs of fixed-size blocks; a block stores `block_size` consecutive
elements of a row in `block_bytes` bytes. Each dequantizer takes blocks as uint8
[num_blocks, block_bytes] and returns float32 [num_blocks, block_size], vectorised over blocks
in numpy (its uint8 bit operations run ~2.5x faster than torch's on CPU).
Layouts follow ggml's format description (ggml-common.h); all multi-byte fields are
little-endian, `d`/`m`/`dmin` are float16:

    Q8_0  d, int8 q[32]                       y = d * q
    Q4_0  d, 16 bytes of nibbles              y = d * (q - 8)    low nibbles are y[0:16]
    Q4_1  d, m, 16 bytes of nibbles           y = d * q + m
    Q5_0  d, 32 high bits, nibbles            y = d * (q - 16)   bit j is y[j]'s fifth bit
    Q5_1  d, m, 32 high bits, nibbles         y = d * q + m
    Q4_K  256 values: d, dmin, 12 bytes of 6-bit (scale, min) for 8 sub-blocks of 32, nibbles
    Q5_K  as Q4_K plus 32 bytes of fifth bits (bit k of byte l belongs to sub-block k)
    Q6_K  256 values: 128 bytes of low nibbles, 64 of 2-bit highs, int8 scales per 16, d
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Dequantizer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BlockFormat:
    name: str
    type_id: int
    """ggml's type id, as stored in a GGUF tensor info."""
    block_size: int
    block_bytes: int
    dequantize: Dequantizer


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 field at byte `start` of every block, as float32 [num_blocks, 1]."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[n, k] bytes -> uint8 [n, 2k]: all low nibbles, then all high nibbles."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


def _nibble_values(packed: np.ndarray) -> np.ndarray:
    """`_nibbles` as float32, written straight into one array (the hot path of Q4_0/Q4_1)."""
    half = packed.shape[1]
    out = np.empty((packed.shape[0], 2 * half), np.float32)
    out[:, :half] = packed & 0x0F
    out[:, half:] = packed >> 4
    return out


def _bits(packed: np.ndarray) -> np.ndarray:
    """[n, k] bytes -> [n, 8, k]: bit b of byte i at [:, b, i]."""
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return (packed[:, None, :] >> shifts) & 1


def _f32(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks).view(np.float32)


def _f16_values(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks).view(np.float16).astype(np.float32)


def _bf16(blocks: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32."""
    upper = np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32) << 16
    return upper.view(np.float32)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    values = _nibble_values(blocks[:, 2:])
    values -= 8
    return _f16(blocks, 0) * values


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    values = _nibble_values(blocks[:, 4:])
    values *= _f16(blocks, 0)
    values += _f16(blocks, 2)
    return values


def _fifth_bits(packed: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: 4 bytes of high bits -> [n, 32] (bit j of the little-endian word is y[j]'s)."""
    return _bits(packed).transpose(0, 2, 1).reshape(-1, 32)


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 6:]) | (_fifth_bits(blocks[:, 2:6]) << 4)
    return _f16(blocks, 0) * (q.astype(np.float32) - 16)


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 8:]) | (_fifth_bits(blocks[:, 4:8]) << 4)
    return _f16(blocks, 0) * q.astype(np.float32) + _f16(blocks, 2)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 6-bit (scale, min) of the 8 sub-blocks, each [n, 8] float32.
    Sub-blocks 0-3 use the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7
    take 4 bits from bytes 8-11 and their top 2 bits from the top of bytes 0-3 / 4-7."""
    low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & 63, (high & 0x0F) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 63, (high >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_quant(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: y = d * scale * q - dmin * min per sub-block; q is [n, 8, 32]."""
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    d = (_f16(blocks, 0) * scales)[:, :, None]
    dm = (_f16(blocks, 2) * mins)[:, :, None]
    return (d * q.astype(np.float32) - dm).reshape(-1, 256)


def _k_nibbles(packed: np.ndarray) -> np.ndarray:
    """128 bytes -> [n, 8, 32]: chunk c of 32 bytes gives sub-block 2c (low) and 2c+1 (high)."""
    chunks = packed.reshape(-1, 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    return _k_quant(blocks, _k_nibbles(blocks[:, 16:]))


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    return _k_quant(blocks, _k_nibbles(blocks[:, 48:]) | (_bits(blocks[:, 16:48]) << 4))


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    """Each half of 128 values: ql bytes 0-31 give q1 (low) / q3 (high), 32-63 give q2 / q4;
    qh byte l holds the top 2 bits of q1, q2, q3, q4 at bits 0, 2, 4, 6; one scale per 16."""
    ql = blocks[:, :128].reshape(-1, 2, 2, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3
    q = (low | (high << 4)).astype(np.int16) - 32
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = (_f16(blocks, 208) * scales)[:, :, None]
    return (d * q.reshape(-1, 16, 16).astype(np.float32)).reshape(-1, 256)


FORMATS: dict[int, BlockFormat] = {
    f.type_id: f
    for f in (
        BlockFormat("F32", 0, 1, 4, _f32),
        BlockFormat("F16", 1, 1, 2, _f16_values),
        BlockFormat("Q4_0", 2, 32, 18, _q4_0),
        BlockFormat("Q4_1", 3, 32, 20, _q4_1),
        BlockFormat("Q5_0", 6, 32, 22, _q5_0),
        BlockFormat("Q5_1", 7, 32, 24, _q5_1),
        BlockFormat("Q8_0", 8, 32, 34, _q8_0),
        BlockFormat("Q4_K", 12, 256, 144, _q4_k),
        BlockFormat("Q5_K", 13, 256, 176, _q5_k),
        BlockFormat("Q6_K", 14, 256, 210, _q6_k),
        BlockFormat("BF16", 30, 1, 2, _bf16),
    )
}

OTHER_TYPE_NAMES = {
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
"""Names of ggml types kvrelay reads in a file but cannot dequantize (for error messages)."""


def type_name(type_id: int) -> str:
    if type_id in FORMATS:
        return FORMATS[type_id].name
    return OTHER_TYPE_NAMES.get(type_id, f"type {type_id}")


def dequantize_rows(raw: np.ndarray, fmt: BlockFormat, rows: int, cols: int) -> torch.Tensor:
    """uint8 bytes of a [rows, cols] tensor -> float32 [rows, cols]. The caller has checked
    that cols is a multiple of block_size and that raw holds exactly the tensor's bytes."""
    blocks = raw.reshape(-1, fmt.block_bytes)
    return torch.from_numpy(fmt.dequantize(blocks).reshape(rows, cols))
