"""`--quantization` (workers/model/quant/load_mode.py) from the command line to the loader:
`kvrelay generate --quantization gguf` on SmolLM2's Q4_1 file keeps the projections 4-bit and
prints the dequantized model's greedy text; `kvrelay serve --quantization` reaches every
worker's engine config; the default (auto) keeps a GGUF file 4-bit on CUDA only; a choice
the model cannot take fails before anything loads, naming it."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from cluster.serve import build_config, parse_args
from tests.gguf_files import write_gguf
from tests.smollm2 import smollm2_path
from workers import generate_cli
from workers.attention.torch_backend import TorchAttentionBackend
from workers.errors import InvalidModelConfig, InvalidParameter
from workers.model.config import ModelConfig
from workers.model.llama import LlamaForCausalLM
from workers.model.quant.int4_weight import Int4Weight
from workers.model.quant.load_mode import check_load_mode, resolve_load_mode
from workers.model.weights import load_checkpoint

gguf = pytest.importorskip("gguf")


@pytest.mark.timeout(900)
def test_generate_quantization_gguf_keeps_smollm2_4bit_and_prints_the_dequantized_text(capsys):
    """On the CPU the 4-bit layout is dequantized per call from the file's own values, so the
    greedy text is the dequantized-at-load model's exactly (the GPU test runs the kernel)."""
    path = str(smollm2_path())
    args = ["--model", "smollm2", "--prompt", "The capital of France is", "--max-tokens", "6",
            "--device", "cpu", "--num-blocks", "16"]
    kept_args = generate_cli.build_parser().parse_args([*args, "--quantization", "gguf"])
    config = generate_cli.engine_config(kept_args, path)
    assert config.quantization == "gguf"
    assert resolve_load_mode(path, config.quantization, "cpu").keep_gguf
    texts = {}
    for choice in ("gguf", "none"):
        assert generate_cli.main([*args, "--quantization", choice]) == 0
        texts[choice] = capsys.readouterr().out
    assert texts["gguf"] == texts["none"]
    assert "Paris" in texts["gguf"]


@pytest.mark.timeout(900)
def test_1p1d_smollm2_kept_4bit_serves_the_dequantized_models_greedy_tokens():
    """The serve path: `--quantization gguf` reaches both workers (their engine configs are
    `ClusterConfig.engine_for(role)`), each holds the Q4_1 projections 4-bit, and the pair's
    greedy tokens equal a colocated engine's on the dequantized file."""
    from tests.cluster.helpers import ChunkCollector
    from tests.cluster.test_disaggregated_workers import (
        make_spec,
        request,
        run_requests,
        wait_all_free,
    )
    from tests.smollm2 import PLAIN_PROMPTS
    from workers.actors.decode_worker import DecodeWorker
    from workers.actors.prefill_worker import PrefillWorker
    from workers.engine.engine import LLMEngine
    from workers.engine.sampling_params import SamplingParams
    from workers.text.tokenizer import Tokenizer

    path = smollm2_path()
    cluster = build_config(parse_args(["--model", str(path), "--quantization", "gguf"]))
    specs = {}
    for role in ("prefill", "decode"):
        spec = make_spec(path, f"{role}-0", "gloo")
        specs[role] = dataclasses.replace(spec, engine=dataclasses.replace(
            cluster.engine_for(role), cache=spec.engine.cache))
    collector = ChunkCollector()
    prefill, decode = PrefillWorker(specs["prefill"]), DecodeWorker(specs["decode"])
    try:
        for worker in (prefill, decode):
            qkv = worker.engine.runner.model.layers["0"].self_attn.qkv_proj
            assert isinstance(qkv.quantized, Int4Weight)
        tokenizer = Tokenizer(path)
        batch = [tokenizer.encode(text) for text in PLAIN_PROMPTS]
        reqs = [request(f"kept-{i}", ids, collector.address, 6) for i, ids in enumerate(batch)]
        asyncio.run(run_requests(prefill, decode, collector, reqs))
        dequantized = LLMEngine(dataclasses.replace(specs["prefill"].engine, role="colocated",
                                                    quantization="none"))
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        expected = [o.token_ids for o in dequantized.generate(batch, params)]
        assert [collector.tokens(r.request_id) for r in reqs] == expected
        wait_all_free(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()
        collector.close()


def test_quantization_gguf_loads_int4_weights_and_none_dense(tiny_model_dir, tmp_path):
    path = write_gguf(tiny_model_dir, tmp_path / "model.gguf", gguf.GGMLQuantizationType.Q4_1)
    for choice, kept in (("gguf", True), ("none", False), ("auto", False)):
        model = LlamaForCausalLM(ModelConfig.from_path(path), TorchAttentionBackend())
        load_checkpoint(model, path, quantization=choice)
        qkv = model.layers["0"].self_attn.qkv_proj
        assert isinstance(qkv.quantized, Int4Weight) is kept, choice
        assert (qkv.weight is None) is kept, choice


def test_auto_keeps_a_gguf_file_4bit_on_cuda_and_dequantizes_it_on_the_cpu(tiny_model_dir,
                                                                           tmp_path):
    path = write_gguf(tiny_model_dir, tmp_path / "model.gguf", gguf.GGMLQuantizationType.Q4_0)
    assert resolve_load_mode(path, "auto", "cuda").keep_gguf
    assert not resolve_load_mode(path, "auto", "cpu").keep_gguf
    assert not resolve_load_mode(tiny_model_dir, "auto", "cuda").keep_gguf


def test_serve_quantization_flag_reaches_every_workers_engine_config():
    config = build_config(parse_args(["--model", "smollm2", "--quantization", "gguf"]))
    assert {config.engine_for(role).quantization for role in ("prefill", "decode")} == {"gguf"}
    assert build_config(parse_args(["--model", "smollm2"])).engine.quantization == "auto"


def test_gguf_choices_on_a_checkpoint_folder_fail_naming_the_flag(tiny_model_dir, capsys):
    for choice in ("gguf", "none"):
        with pytest.raises(InvalidParameter, match="quantization"):
            check_load_mode(tiny_model_dir, choice)
    args = ["--model", str(tiny_model_dir), "--prompt", "hi", "--quantization", "gguf"]
    assert generate_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "InvalidParameter" in err and "'quantization'" in err


def test_fp8_at_load_on_a_quantized_gguf_file_fails_naming_a_quantized_tensor(tiny_model_dir,
                                                                              tmp_path):
    path = write_gguf(tiny_model_dir, tmp_path / "model.gguf", gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(InvalidModelConfig, match=r"weight.: .* already quantized \(Q8_0\)"):
        check_load_mode(path, "fp8")


def test_serve_refuses_a_bad_quantization_before_ray(tiny_model_dir, capsys):
    from cluster.serve import main

    assert main(["--model", str(tiny_model_dir), "--quantization", "gguf", "--port", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "'quantization'" in err[0], err
    assert torch.get_default_dtype() == torch.float32
