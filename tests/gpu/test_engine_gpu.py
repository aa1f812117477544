"""Engine on the GPU: decode steps replayed from CUDA graphs give the same greedy tokens as
eager steps and as transformers (float32, tiny model), for both attention backends.

Self-contained (no fixtures from tests/conftest.py), so it runs with
`pytest -m gpu --confcutdir=tests/gpu tests/gpu` on an image without ray/fastapi.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

NUM_PROMPTS = 16
MAX_NUM_SEQS = 12  # < NUM_PROMPTS: requests queue, so decode batches shrink and grow


@functools.lru_cache(maxsize=1)
def _tiny_model_dir() -> str:
    import tempfile

    from workers.model.tiny_model import make_variant

    return str(make_variant(tempfile.mkdtemp(prefix="kvrelay-gpu-"), "llama"))


def _workload(vocab_size: int) -> list[tuple[list[int], int]]:
    """16 prompts of mixed lengths, each with its own output length (so sequences finish at
    different steps and decode batches of 1..12 are padded up to the next bucket)."""
    rng = random.Random(5)
    return [
        ([rng.randrange(4, vocab_size) for _ in range(rng.randrange(3, 40))], 5 + (7 * i) % 23)
        for i in range(NUM_PROMPTS)
    ]


def _engine_tokens(backend: str, enforce_eager: bool,
                   dtype: str = "float32") -> tuple[list[list[int]], object]:
    from workers.config import CacheConfig, EngineConfig, SchedulerConfig
    from workers.engine.engine import LLMEngine
    from workers.engine.sampling_params import SamplingParams

    config = EngineConfig(
        model=_tiny_model_dir(), dtype=dtype, device="cuda", attention_backend=backend,
        max_model_len=128, enforce_eager=enforce_eager,
        cache=CacheConfig(block_size=16, num_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=96),
    )
    engine = LLMEngine(config)
    workload = _workload(engine.model_config.vocab_size)
    params = [SamplingParams(max_tokens=n, min_tokens=n, temperature=0) for _, n in workload]
    outputs = engine.generate([prompt for prompt, _ in workload], params)
    assert engine.num_free_blocks == engine.num_total_blocks
    return [o.token_ids for o in outputs], engine.runner.graph_runner


@functools.lru_cache(maxsize=1)
def _transformers_tokens() -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_tiny_model_dir(), dtype=torch.float32).eval()
    tokens = []
    for prompt, n in _workload(model.config.vocab_size):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                pad_token_id=0,
            )
        tokens.append(out[0, len(prompt):].tolist())
    return tokens


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_with_cuda_graphs_equals_eager_and_transformers(backend):
    graphed, graph_runner = _engine_tokens(backend, enforce_eager=False)
    eager, no_graphs = _engine_tokens(backend, enforce_eager=True)
    assert graph_runner is not None and no_graphs is None
    assert graph_runner.buckets == [1, 2, 4, 8, 12]
    assert graphed == eager
    assert graphed == _transformers_tokens()



@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rope_fused_into_the_cache_write_gives_the_same_tokens(dtype, monkeypatch):
    """Fused ops with the triton backend rotate q and write the rotated k/v in one kernel
    (kernels/rotary_cache_write.py); with the backend's `fuses_rope` off, the same engine runs
    the two-kernel path (rotary, then cache write). Bit-equal caches give equal greedy tokens,
    CUDA graphs on."""
    from workers.attention.triton_backend import TritonAttentionBackend

    fused, _ = _engine_tokens("triton", enforce_eager=False, dtype=dtype)
    monkeypatch.setattr(TritonAttentionBackend, "fuses_rope", False)
    two_kernels, _ = _engine_tokens("triton", enforce_eager=False, dtype=dtype)
    assert fused == two_kernels
