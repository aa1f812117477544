"""kernels/argmax.py against torch's argmax: the first index of each row's maximum, across
chunk boundaries, with ties, -inf rows and NaN (CPU under TRITON_INTERPRET=1; the GPU runs
the same cases compiled)."""

from __future__ import annotations

import pytest
import torch

from kernels.argmax import CHUNK, argmax_rows


def rows_with_ties(rows: int, n: int, device: str) -> torch.Tensor:
    """Random rows whose maximum appears several times, in different chunks."""
    generator = torch.Generator().manual_seed(rows * 7919 + n)
    x = torch.randn(rows, n, generator=generator)
    for r in range(rows):
        picks = torch.randint(0, n, (3,), generator=generator)
        x[r, picks] = x[r].max() + 1.0  # the same maximum at up to three places
    return x.to(device)


@pytest.mark.parametrize("n", [1, 77, CHUNK, 3 * CHUNK + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_argmax_rows_is_torchs_first_index_of_the_maximum(n, dtype, device):
    x = rows_with_ties(4, n, device).to(dtype)
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


def test_argmax_rows_of_inf_nan_and_strided_rows(device):
    n = 2 * CHUNK + 3
    x = torch.randn(5, n).to(device)
    x[0] = float("-inf")  # every entry banned: index 0, as torch
    x[1, CHUNK + 1] = float("inf")
    x[2, 2 * CHUNK + 1] = float("nan")  # NaN counts as the maximum, as in torch
    x[2, 7] = float("inf")
    x[3, [5, CHUNK + 9]] = float("nan")
    wide = torch.zeros(5, n + 11, device=device)
    wide[:, :n] = x
    for rows in (x, wide[:, :n]):
        assert torch.equal(argmax_rows(rows), rows.argmax(dim=-1))
    assert argmax_rows(x[:0]).shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 8])
def test_argmax_rows_compiled_at_llama3_vocabulary(rows):
    x = rows_with_ties(rows, 128256, "cuda")
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
