"""`kv_cache_dtype="fp8"` in the engine (CPU, torch backend): the runner allocates e4m3 caches
(one byte per element, so a memory budget holds 4x the blocks of float32), and a model reading
its own fp8 KV stays close to the same model with float32 KV.

Tolerance (what fp8 costs, measured on the tiny models, teacher-forced so both runs see the
same tokens): every logit within 1.0 of the float32 KV run's (measured 0.32-0.56; logits span
~7.3 with std ~1.2), mean difference under 0.1, and the same top-1 token at >= 85% of positions
(measured 92-95%; the flips are where float32's top two are within 0.1). Greedy generation is
not compared token for token: a random tiny model's near-ties flip after 5-13 tokens.

SmolLM2-135M (the real model, float32 weights from its Q4_1 GGUF) on a fixed 58-token text:
perplexity 12.21 with float32 KV, 12.66 with fp8 KV (+3.7%); mean |logit difference| 0.20;
the tolerance is +8% and 0.3, and `kvrelay generate --kv-cache-dtype fp8` still answers
" Paris." Scales of 1.0 (not calibrated): SmolLM2's K reach |16| and V |10| at most, far
inside e4m3's 448, and per-layer amax/448 scales measured the same mean logit difference
(0.21; perplexity 12.16) on this text, so calibration buys nothing measurable here. These
runs use 1.0 (the GGUF file carries no scales); checkpoint scales, loaded when present:
tests/workers/test_kv_cache_scales.py. Through that path (2026-11-27, CPU, float32): SmolLM2
written by `kvrelay quantize --kv-cache-scales` (max |K| per layer 10-20, max |V| 0.6-11.7 over
the built-in prompts), perplexity on workers/bench/quant_quality.py's ~450-token text: float32
KV 9.186, fp8 KV with 1.0 9.261, with the calibrated scales 9.357 (mean |logit difference|
0.306 and 0.302): e4m3 is a float format, so a scale only moves values away from saturation
or the subnormals, and with K and V this far inside 448 it buys nothing here.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.smollm2 import smollm2_path
from workers import generate_cli
from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.engine.model_runner import ModelRunner
from workers.errors import InvalidParameter
from workers.text.tokenizer import Tokenizer

FIXED_TEXT = (
    "The history of the city begins in the Roman era, when a small settlement grew on the "
    "river bank. Over the centuries it became a centre of trade, and its markets drew "
    "merchants from across the region. Today the old town is known for its narrow streets, "
    "its cathedral and its museums.")


def _runner(model_dir, kv_cache_dtype: str, **cache) -> ModelRunner:
    cache = CacheConfig(block_size=4, kv_cache_dtype=kv_cache_dtype, **cache)
    return ModelRunner(EngineConfig(model=str(model_dir), dtype="float32", device="cpu",
                                    cache=cache))


def test_fp8_caches_hold_one_byte_per_element_and_four_times_the_blocks(tiny_model_dir):
    budget = 1 << 20
    full, fp8 = (_runner(tiny_model_dir, kv, kv_cache_memory=budget) for kv in ("auto", "fp8"))
    assert {k.dtype for pair in fp8.kv_caches for k in pair} == {torch.float8_e4m3fn}
    assert full.kv_caches[0][0].dtype == torch.float32 and fp8.dtype == torch.float32
    assert fp8.kv_bytes_per_block * 4 == full.kv_bytes_per_block
    assert fp8.num_blocks == 4 * full.num_blocks
    with pytest.raises(InvalidParameter, match="kv_cache_dtype"):
        _runner(tiny_model_dir, "int4", num_blocks=8)


def _teacher_forced_logits(runner: ModelRunner, tokens: list[int], make_step) -> torch.Tensor:
    """Logits of a 20-token prefill (every position) then one decode step per later token."""
    table = list(range(-(-len(tokens) // 4)))
    logits = [runner.execute(make_step([(tokens[:20], 20, table)], 4, "all"))]
    for n in range(21, len(tokens) + 1):
        logits.append(runner.execute(make_step([(tokens[:n], 1, table)], 4)))
    return torch.cat(logits)


@pytest.mark.parametrize("variant", ["llama", "mqa"])
def test_fp8_kv_logits_stay_close_to_float32_kv(variant, make_model_dir, make_step):
    model_dir = make_model_dir(variant)
    rng = random.Random(1)
    tokens = [rng.randrange(10, 200) for _ in range(40)]
    full, fp8 = (_teacher_forced_logits(_runner(model_dir, kv, num_blocks=16), tokens,
                                        make_step) for kv in ("auto", "fp8"))
    diff = (fp8 - full).abs()
    assert diff.max() < 1.0 and diff.mean() < 0.1, (diff.max(), diff.mean())
    assert (fp8.argmax(-1) == full.argmax(-1)).float().mean() >= 0.85
    assert diff.max() > 0  # the cache really was quantized


@pytest.mark.slow
def test_smollm2_fp8_kv_perplexity_stays_within_tolerance(make_step, capsys):
    path = str(smollm2_path())
    ids = Tokenizer(path).encode(FIXED_TEXT)
    table = list(range(-(-len(ids) // 16)))
    logits, perplexity = {}, {}
    for kv in ("auto", "fp8"):
        runner = ModelRunner(EngineConfig(
            model=path, dtype="float32", device="cpu",
            cache=CacheConfig(block_size=16, num_blocks=8, kv_cache_dtype=kv)))
        logits[kv] = runner.execute(make_step([(ids, len(ids), table)], 16, "all"))
        log_probs = torch.log_softmax(logits[kv][:-1], -1)
        nll = -log_probs.gather(1, torch.tensor(ids[1:])[:, None]).mean()
        perplexity[kv] = float(torch.exp(nll))
    assert perplexity["fp8"] <= 1.08 * perplexity["auto"], perplexity
    assert (logits["fp8"] - logits["auto"]).abs().mean() < 0.3
    assert generate_cli.main(["--model", path, "--prompt", "The capital of France is",
                              "--max-tokens", "3", "--kv-cache-dtype", "fp8"]) == 0
    assert capsys.readouterr().out.startswith(" Paris.")


def test_serve_flag_reaches_every_workers_cache_config():
    from cluster.serve import build_config, parse_args

    config = build_config(parse_args(["--model", "/m/tiny-llama", "--kv-cache-dtype", "fp8"]))
    assert config.engine.cache.kv_cache_dtype == "fp8"
    assert build_config(parse_args(["--model", "/m/x"])).engine.cache.kv_cache_dtype == "auto"
    with pytest.raises(SystemExit):
        parse_args(["--model", "/m/x", "--kv-cache-dtype", "int8"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_kv_graph_decode_equals_eager_on_gpu(backend, tiny_model_dir, make_step):
    """CUDA graphs capture the fp8 cache write and read (scales are device tensors read in
    the kernels): graphed decode logits equal eager ones, padded batches included, and the
    real blocks hold the same fp8 K/V (to one e4m3 step where float summation order moved
    a value across a rounding boundary)."""
    from test_cuda_graph import _decode_logits

    runners = [ModelRunner(EngineConfig(
        model=str(tiny_model_dir), dtype="float32", device="cuda", attention_backend=backend,
        max_model_len=256, enforce_eager=eager,
        cache=CacheConfig(block_size=16, num_blocks=72, kv_cache_dtype="fp8"),
        scheduler=SchedulerConfig(max_num_seqs=8))) for eager in (False, True)]
    assert runners[0].graph_runner is not None and runners[1].graph_runner is None
    with_graph, without = _decode_logits(runners, make_step, runners[0].model_config.vocab_size,
                                         3)
    torch.testing.assert_close(with_graph, without, atol=2e-3, rtol=0)
    for graph_kv, eager_kv in zip(runners[0].kv_caches, runners[1].kv_caches, strict=True):
        for graphed, eager in zip(graph_kv, eager_kv, strict=True):
            assert graphed.dtype == torch.float8_e4m3fn
            torch.testing.assert_close(graphed.float(), eager.float(), atol=2 ** -9, rtol=2 ** -3)
