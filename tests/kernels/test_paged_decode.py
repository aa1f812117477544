"""Split-KV paged decode vs the torch reference: one token per sequence and speculative
verification (2..8 tokens, causal among them), GQA 1/4/8, split counts 1 and several."""

from __future__ import annotations

import pytest
import torch
from paged_case import decode_ref, make_case, run_decode
from tolerances import assert_close

from kernels.paged_decode import choose_num_splits


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("num_kv_heads", [8, 2, 1], ids=["mha", "gqa4", "mqa8"])
def test_decode_one_token_matches_reference(num_kv_heads: int, num_splits: int,
                                            device: str) -> None:
    seq_lens = [1, 23, 50, 9]
    c = make_case([1] * 4, seq_lens, num_heads=8, num_kv_heads=num_kv_heads, head_dim=32,
                  block_size=8, dtype=torch.float32, device=device,
                  seed=num_kv_heads * 10 + num_splits)
    assert_close(run_decode(c, 1, num_splits), decode_ref(c))


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_verification_tokens_are_causal_among_themselves(num_splits: int,
                                                                device: str) -> None:
    q_lens, seq_lens = [1, 3, 8, 2], [9, 37, 20, 2]
    c = make_case(q_lens, seq_lens, num_heads=8, num_kv_heads=2, head_dim=32, block_size=4,
                  dtype=torch.float32, device=device, seed=100 + num_splits)
    assert_close(run_decode(c, 8, num_splits), decode_ref(c))


def test_decode_odd_head_dim_and_auto_splits(device: str) -> None:
    c = make_case([1, 2], [70, 33], num_heads=4, num_kv_heads=1, head_dim=40, block_size=16,
                  dtype=torch.float32, device=device, seed=5)
    assert_close(run_decode(c, 2, None), decode_ref(c))


def test_decode_skips_sequences_longer_than_max_q_len(device: str) -> None:
    c = make_case([1, 12, 2], [5, 12, 18], num_heads=4, num_kv_heads=2, head_dim=16,
                  block_size=8, dtype=torch.float32, device=device, seed=9)
    out = run_decode(c, 2, 2)
    ref = decode_ref(c)
    assert out[1:13].isnan().all()
    assert_close(out[:1], ref[:1])
    assert_close(out[13:], ref[13:])


def test_split_count_fills_the_gpu_but_keeps_splits_long() -> None:
    assert choose_num_splits(1, 8, 16384, num_sms=132, block_n=64) == 33
    assert choose_num_splits(256, 8, 16384, num_sms=132, block_n=64) == 1
    assert choose_num_splits(1, 8, 100, num_sms=132, block_n=64) == 1
