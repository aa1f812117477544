"""The tensors of one quantized projection as a checkpoint stores them, checked against what
its format expects; every error names the tensor, the format and the expectation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.errors import InvalidTensor
from workers.model.quant.scheme import QuantScheme

INTEGER_DTYPES = (torch.int32, torch.int64, torch.int16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class ProjectionTensors:
    """`tensors[suffix]` is the checkpoint's `{prefix}.{suffix}` (e.g. prefix
    'model.layers.0.self_attn.q_proj', suffix 'qweight'); a suffix the checkpoint lacks is
    absent. `in_features` / `out_features` are the projection's full (unsharded) sizes."""

    prefix: str
    tensors: dict[str, torch.Tensor]
    scheme: QuantScheme
    in_features: int
    out_features: int

    def get(
        self, suffix: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...], meaning: str
    ) -> torch.Tensor:
        """The tensor, if its dtype is one of `dtypes` and its shape is `shape`; `meaning`
        explains the shape in the error ('K / 8 = 72 packed input rows x N = 192')."""
        name = f"{self.prefix}.{suffix}"
        expected = f"{_dtypes(dtypes)} {list(shape)} ({meaning})"
        tensor = self.tensors.get(suffix)
        if tensor is None:
            raise InvalidTensor(name, self.scheme.label, expected, "no such tensor")
        if tensor.dtype not in dtypes or tuple(tensor.shape) != shape:
            raise InvalidTensor(name, self.scheme.label, expected,
                                f"{tensor.dtype} {list(tensor.shape)}")
        return tensor

    def invalid(self, suffix: str, expected: str, found: str) -> InvalidTensor:
        return InvalidTensor(f"{self.prefix}.{suffix}", self.scheme.label, expected, found)


def _dtypes(dtypes: tuple[torch.dtype, ...]) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)
