"""Checkpoint FP8 KV-cache scales (workers/model/kv_scales.py) with `--kv-cache-dtype fp8`:
`kvrelay quantize --kv-cache-scales` writes max|K| / 448 and max|V| / 448 per layer (checked
against transformers' own KV cache); loaded, they reach every layer, the cache write (the
fp8 cache holds the float32 K/V quantized at those scales, bit for bit) and attention (the
logits equal a torch reference attending over K/V rounded through e4m3 at those scales, and
differ from the default-scale run); the vLLM-era names load too; no scales fall back to 1.0
with one log line; a bad or partial set is refused naming the tensor; and a 1P+1D pair
generates the colocated fp8 engine's greedy tokens with them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels.kv_quant import FP8_MAX, dequantize_kv, quantize_kv
from tests.cluster.helpers import ChunkCollector, prompts, request
from tests.cluster.test_disaggregated_workers import make_spec, run_requests, wait_all_free
from workers.actors.decode_worker import DecodeWorker
from workers.actors.prefill_worker import PrefillWorker
from workers.attention.torch_backend import TorchAttentionBackend
from workers.config import CacheConfig, EngineConfig
from workers.engine.engine import LLMEngine
from workers.engine.model_runner import ModelRunner
from workers.engine.sampling_params import SamplingParams
from workers.engine.step_tensors import build_step_tensors
from workers.errors import InvalidTensor, MissingTensor
from workers.model.config import ModelConfig
from workers.model.kv_scales import CALIBRATION_PROMPTS, scale_names
from workers.model.llama import LlamaForCausalLM
from workers.model.quantize import main as quantize_main
from workers.model.quantize import quantize_checkpoint
from workers.model.weights import load_checkpoint
from workers.text.tokenizer import Tokenizer

BLOCK = 4
TOKENS = [5, 17, 42, 99, 7, 300, 12, 8, 250, 77, 41, 63, 19, 180, 33, 64, 21, 90, 150, 3]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton on CPU needs TRITON_INTERPRET=1"))]


@pytest.fixture(scope="module")
def scaled_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kv-scales")
    assert quantize_main(["--model", str(tiny_model_dir), "--out", str(out),
                          "--kv-cache-scales"]) == 0
    return out


def file_scales(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
            if k.endswith("_scale")}


def runner(model_dir, kv: str, backend: str = "torch") -> ModelRunner:
    return ModelRunner(EngineConfig(
        model=str(model_dir), dtype="float32", device="cpu", attention_backend=backend,
        cache=CacheConfig(block_size=BLOCK, num_blocks=8, kv_cache_dtype=kv)))


def test_calibrated_scales_are_max_abs_over_448_of_transformers_kv(scaled_dir, tiny_model_dir,
                                                                   hf_reference):
    model = hf_reference(tiny_model_dir)
    tokenizer = Tokenizer(tiny_model_dir)
    layers = model.config.num_hidden_layers
    amax = torch.zeros(layers, 2)
    with torch.no_grad():
        for prompt in CALIBRATION_PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt)])
            cache = model(ids, use_cache=True).past_key_values
            for i in range(layers):
                k, v = cache.layers[i].keys, cache.layers[i].values
                amax[i] = torch.maximum(amax[i], torch.stack([k.abs().max(), v.abs().max()]))
    scales = file_scales(scaled_dir)
    assert len(scales) == 2 * layers
    for i in range(layers):
        names = scale_names(i)
        for j, kind in enumerate("kv"):
            stored = scales[names[kind]]
            assert stored.shape == (1,) and stored.dtype == torch.float32
            torch.testing.assert_close(stored * FP8_MAX, amax[i, j : j + 1], rtol=1e-5, atol=0)
    config = json.loads((scaled_dir / "config.json").read_text())
    assert "quantization_config" not in config  # weights copied as stored


def test_fp8_checkpoint_with_scales_declares_its_kv_cache_scheme(tiny_model_dir, tmp_path):
    folder = quantize_checkpoint(str(tiny_model_dir), tmp_path / "fp8", "fp8",
                                 kv_cache_scales=True)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"]["type"] == "float"
    assert len(file_scales(folder)) > 0
    fp8 = runner(folder, "fp8")  # fp8 weights and fp8 KV with the file's scales
    assert float(fp8.model.layers["1"].self_attn.v_scale) == float(
        file_scales(folder)[scale_names(1)["v"]])


def test_loaded_scales_reach_every_layer_only_with_an_fp8_cache(scaled_dir):
    scales = file_scales(scaled_dir)
    fp8, full = runner(scaled_dir, "fp8"), runner(scaled_dir, "auto")
    for index, layer in fp8.model.layers.items():
        names = scale_names(index)
        assert torch.equal(layer.self_attn.k_scale, scales[names["k"]])
        assert torch.equal(layer.self_attn.v_scale, scales[names["v"]])
        assert float(layer.self_attn.k_scale) != 1.0
    assert all(float(layer.self_attn.k_scale) == 1.0 for layer in full.model.layers.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaded_scales_reach_the_cache_write(backend, scaled_dir, tiny_model_dir, make_step):
    """The fp8 cache after a prefill holds the float32 run's K/V quantized at the loaded
    scales, bit for bit, and the default-scale (1.0) run's cache differs. Layer 0 only: its
    K/V do not depend on attention, while later layers' inputs carry the fp8 rounding of the
    layers before (test_loaded_scales_reach_attention compares every layer's cache)."""
    step = make_step([(TOKENS, len(TOKENS), list(range(len(TOKENS) // BLOCK)))], BLOCK)
    caches = {}
    for name, folder, kv in (("float32", scaled_dir, "auto"), ("scaled", scaled_dir, "fp8"),
                             ("default", tiny_model_dir, "fp8")):
        r = runner(folder, kv, backend)
        r.execute(step)
        caches[name] = (r, [tuple(t[: len(TOKENS) // BLOCK] for t in kv) for kv in r.kv_caches])
    layer = caches["scaled"][0].model.layers["0"].self_attn
    for j, scale in enumerate((layer.k_scale, layer.v_scale)):
        expected = quantize_kv(caches["float32"][1][0][j], scale)
        got, default = caches["scaled"][1][0][j], caches["default"][1][0][j]
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), j
        assert not torch.equal(got.view(torch.uint8), default.view(torch.uint8)), j


class RoundTripBackend(TorchAttentionBackend):
    """The reference: new K/V rounded through e4m3 at the layer's scales, then written to and
    attended over in a float32 cache (what an fp8 cache's reads give back, as floats)."""

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, k_scale=None, v_scale=None):
        k = dequantize_kv(quantize_kv(k, k_scale), k_scale)
        v = dequantize_kv(quantize_kv(v, v_scale), v_scale)
        return super().forward(q, k, v, k_cache, v_cache, meta, scale)


def _teacher_forced(execute, make_step) -> torch.Tensor:
    table = list(range(len(TOKENS) // BLOCK))
    logits = [execute(make_step([(TOKENS[:12], 12, table)], BLOCK, "all"))]
    for n in range(13, len(TOKENS) + 1):
        logits.append(execute(make_step([(TOKENS[:n], 1, table)], BLOCK)))
    return torch.cat(logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaded_scales_reach_attention(backend, scaled_dir, tiny_model_dir, make_step):
    """Prefill and decode logits with the loaded scales equal the round-trip reference's
    (float32 attention over the same dequantized values) and differ from scales of 1.0."""
    reference = LlamaForCausalLM(ModelConfig.from_path(scaled_dir), RoundTripBackend()).eval()
    load_checkpoint(reference, scaled_dir, kv_cache_dtype="fp8")
    shape = (8, BLOCK, reference.config.num_kv_heads, reference.config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in reference.layers]

    def reference_step(step):
        t = build_step_tensors(step, torch.device("cpu"))
        with torch.no_grad():
            hidden = reference(t.input_ids, t.positions, caches, t.meta)
            return reference.compute_logits(hidden[t.logits_indices])

    expected = _teacher_forced(reference_step, make_step)
    scaled_runner = runner(scaled_dir, "fp8", backend)
    scaled = _teacher_forced(scaled_runner.execute, make_step)
    default = _teacher_forced(runner(tiny_model_dir, "fp8", backend).execute, make_step)
    tolerance = 1e-5 if backend == "torch" else 1e-4  # Triton: its own summation order
    torch.testing.assert_close(scaled, expected, rtol=0, atol=tolerance)
    assert (default - expected).abs().max() > 100 * tolerance
    if backend == "torch":  # same ops as the reference: every layer's cache, dequantized
        blocks = len(TOKENS) // BLOCK
        for (k, v), (ref_k, ref_v), layer in zip(scaled_runner.kv_caches, caches,
                                                 reference.layers.values(), strict=True):
            attn = layer.self_attn
            assert torch.equal(dequantize_kv(k[:blocks], attn.k_scale), ref_k[:blocks])
            assert torch.equal(dequantize_kv(v[:blocks], attn.v_scale), ref_v[:blocks])


def _with_tensors(source: Path, out: Path, rename=None, extra=None, drop=()) -> Path:
    shutil.copytree(source, out)
    tensors = load_file(str(source / "model.safetensors"))
    tensors = {(rename(k) if rename else k): v for k, v in tensors.items() if k not in drop}
    tensors.update(extra or {})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_modelopt_and_kv_scale_names_load(scaled_dir, tmp_path):
    """ModelOpt's k_proj.k_scale / v_proj.v_scale, and AutoFP8's one kv_scale for both."""
    modelopt = _with_tensors(scaled_dir, tmp_path / "modelopt", rename=lambda k: k.replace(
        "self_attn.k_scale", "self_attn.k_proj.k_scale").replace(
        "self_attn.v_scale", "self_attn.v_proj.v_scale"))
    layer = runner(modelopt, "fp8").model.layers["0"].self_attn
    scales = file_scales(scaled_dir)
    assert torch.equal(layer.v_scale, scales[scale_names(0)["v"]])
    combined = {k.replace("k_scale", "kv_scale"): torch.tensor(0.25)
                for k in scales if k.endswith("k_scale")}
    older = _with_tensors(scaled_dir, tmp_path / "kv_scale", extra=combined, drop=set(scales))
    layer = runner(older, "fp8").model.layers["1"].self_attn
    assert float(layer.k_scale) == float(layer.v_scale) == 0.25


def test_no_scales_fall_back_to_one_with_one_log_line(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="workers.model.kv_scales"):
        r = runner(tiny_model_dir, "fp8")
    assert all(float(layer.self_attn.k_scale) == 1.0 for layer in r.model.layers.values())
    lines = [rec for rec in caplog.records if "KV-cache scales" in rec.getMessage()]
    assert len(lines) == 1 and "1.0" in lines[0].getMessage()


def test_a_scale_of_the_wrong_shape_is_refused_naming_the_tensor(scaled_dir, tmp_path):
    name = scale_names(1)["k"]
    bad = _with_tensors(scaled_dir, tmp_path / "per-head", extra={name: torch.ones(2)})
    with pytest.raises(InvalidTensor, match=name.replace(".", r"\.")) as error:
        runner(bad, "fp8")
    assert "[2]" in str(error.value)
    zero = _with_tensors(scaled_dir, tmp_path / "zero", extra={name: torch.zeros(1)})
    with pytest.raises(InvalidTensor, match="positive"):
        runner(zero, "fp8")
    partial = _with_tensors(scaled_dir, tmp_path / "partial", drop={scale_names(0)["v"]})
    with pytest.raises(MissingTensor, match=scale_names(0)["v"].replace(".", r"\.")):
        runner(partial, "fp8")


def _fp8_spec(model_dir, worker_id: str):
    spec = make_spec(model_dir, worker_id, "gloo")
    cache = dataclasses.replace(spec.engine.cache, kv_cache_dtype="fp8")
    return dataclasses.replace(spec, engine=dataclasses.replace(spec.engine, cache=cache))


def test_1p1d_fp8_with_loaded_scales_equals_colocated_fp8(scaled_dir):
    """Both workers load the same checkpoint (one EngineConfig per cluster), so the prefill
    worker quantizes with the scales the decode worker dequantizes with: the greedy tokens
    are the colocated fp8 engine's exactly (and those differ from scales of 1.0)."""
    collector = ChunkCollector()
    prefill = PrefillWorker(_fp8_spec(scaled_dir, "prefill-0"))
    decode = DecodeWorker(_fp8_spec(scaled_dir, "decode-0"))
    try:
        scales = [[(layer.self_attn.k_scale, layer.self_attn.v_scale)
                   for layer in worker.engine.runner.model.layers.values()]
                  for worker in (prefill, decode)]
        assert all(float(k) != 1.0 for k, _ in scales[0])
        assert all(torch.equal(p, d) for ps, ds in zip(*scales, strict=True)
                   for p, d in zip(ps, ds, strict=True))
        engine = LLMEngine(dataclasses.replace(_fp8_spec(scaled_dir, "x").engine,
                                               role="colocated"))
        # Prompts of 3..29 tokens (partial and several blocks), 3..12 new tokens each.
        workload = list(zip(prompts(5, prefill.ready()["vocab_size"], seed=21, low=3, high=30),
                            (3, 12, 7, 10, 5), strict=True))
        reqs = [request(f"scaled-{i}", ids, collector.address, n)
                for i, (ids, n) in enumerate(workload)]
        asyncio.run(run_requests(prefill, decode, collector, reqs))
        for req, (ids, n) in zip(reqs, workload, strict=True):
            greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            (alone,) = engine.generate([ids], greedy)
            assert collector.tokens(req.request_id) == alone.token_ids, req.request_id
        wait_all_free(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()
        collector.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loaded_scales_graph_decode_equals_eager_on_gpu(scaled_dir):
    """CUDA graphs read the scale buffers on replay: graphed and eager decode agree, Triton
    kernels, float32 activations."""
    outputs = []
    for eager in (True, False):
        engine = LLMEngine(EngineConfig(model=str(scaled_dir), dtype="float32", device="cuda",
                                        attention_backend="triton", enforce_eager=eager,
                                        cache=CacheConfig(num_blocks=64, kv_cache_dtype="fp8")))
        assert float(engine.runner.model.layers["0"].self_attn.k_scale) != 1.0
        batch = [TOKENS[:9], TOKENS[4:]]
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        outputs.append([o.token_ids for o in engine.generate(batch, params)])
    assert outputs[0] == outputs[1]
