"""The one tolerance table for kernel-vs-reference comparisons, per dtype.

float32: kernels and references both accumulate in fp32 (IEEE dot products, no tf32), so
only summation order differs. fp16/bf16: output rounding plus probabilities rounded to the
input dtype before the P @ V product (as every flash kernel does).
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # (atol, rtol)
    torch.float32: (2e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, same shape, no NaN anywhere, within the table's tolerance."""
    assert actual.dtype == expected.dtype, f"{actual.dtype} vs {expected.dtype}"
    assert not actual.isnan().any(), f"{int(actual.isnan().sum())} NaN elements (unwritten?)"
    atol, rtol = TOLERANCES[actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)
