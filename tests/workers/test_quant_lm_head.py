"""A quantized LM head (`kvrelay quantize --lm-head`; GPTQ/AWQ `"lm_head": true`,
compressed-tensors without lm_head in `ignore`): it is written as the real tools write it,
loads kept quantized while the input embedding stays a dense table, and the logits (CPU: the
torch reference, dequantize then matmul) equal, bit for bit, those of the checkpoint with every
quantized weight dequantized; so do the greedy tokens. Vocab-parallel ranks hold their rows of
the quantized head (padded when TP does not divide the vocabulary) and TP 2 over gloo gives the
single rank's logits. Tied embeddings with a quantized head are refused, naming the field; a
head claimed quantized but missing a tensor fails naming the tensor and the format."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.workers.quant_checkpoints import build_model, dequantized_copy
from workers.bench.quant_quality import prompt_logits
from workers.engine.sampling_params import SamplingParams
from workers.errors import InvalidModelConfig, InvalidTensor
from workers.model.linear import ParallelLMHead
from workers.model.parallel import ParallelContext
from workers.model.quant.channel_weight import Fp8Weight, Int8Weight
from workers.model.quant.checkpoint_tensors import ProjectionTensors
from workers.model.quant.formats import FORMATS
from workers.model.quant.int4_weight import Int4Weight
from workers.model.quant.scheme import QuantScheme, parse_scheme
from workers.model.quantize import quantize_checkpoint

CASES = {"gptq": (32, Int4Weight), "awq": (32, Int4Weight), "int8": (0, Int8Weight),
         "fp8": (0, Fp8Weight)}
IDS = [5, 17, 42, 99, 7, 300, 12, 8, 250, 77, 41, 63, 19, 180]
PROMPTS = [IDS[:5], IDS[4:]]


@pytest.fixture(scope="module")
def head_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    return {fmt: quantize_checkpoint(str(tiny_model_dir), tmp_path_factory.mktemp(f"{fmt}-head"),
                                     fmt, group, lm_head=True)
            for fmt, (group, _) in CASES.items()}


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_head_is_written_as_the_tools_do_and_loads_kept_quantized(fmt, head_dirs,
                                                                  tiny_model_dir):
    folder = head_dirs[fmt]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    if fmt in ("gptq", "awq"):
        assert config["lm_head"] is True
    else:
        assert config["ignore"] == [] and config["config_groups"]["group_0"]["targets"] == [
            "Linear"]
    stored = load_file(str(folder / "model.safetensors"))
    assert {n for n in stored if n.startswith("lm_head.")} == {
        f"lm_head.{s}" for s in FORMATS[fmt].suffixes}
    model = build_model(folder)
    assert model.lm_head.weight is None and isinstance(model.lm_head.quantized, CASES[fmt][1])
    dense = load_file(str(tiny_model_dir / "model.safetensors"))
    assert torch.equal(model.embed_tokens.weight, dense["model.embed_tokens.weight"])
    error = (model.lm_head.quantized.dequantize() - dense["lm_head.weight"]).abs().max()
    assert 0 < error < 0.1 * dense["lm_head.weight"].abs().max()  # rounded: under a 4-bit step


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_logits_and_greedy_tokens_equal_the_dequantized_checkpoint(fmt, head_dirs, make_engine,
                                                                   tmp_path):
    reference = dequantized_copy(head_dirs[fmt], tmp_path / "dequantized")
    assert torch.equal(prompt_logits(str(head_dirs[fmt]), IDS), prompt_logits(str(reference), IDS))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    quantized = make_engine(model_dir=head_dirs[fmt]).generate(PROMPTS, params)
    expected = make_engine(model_dir=reference).generate(PROMPTS, params)
    assert [o.token_ids for o in quantized] == [o.token_ids for o in expected]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["gptq", "awq", "int8"])
def test_greedy_tokens_with_the_gpu_kernels_equal_the_dequantized_checkpoint(
    fmt, head_dirs, make_engine, tmp_path
):
    """float32 on the GPU: the head's logits through the W4A16 / W8A16 Triton kernels, against
    cuBLAS on the dequantized weights (FP8 left out: its tensor cores round activations)."""
    reference = dequantized_copy(head_dirs[fmt], tmp_path / "dequantized")
    torch.testing.assert_close(prompt_logits(str(head_dirs[fmt]), IDS, device="cuda"),
                               prompt_logits(str(reference), IDS, device="cuda"),
                               atol=1e-4, rtol=1e-4)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    quantized = make_engine(model_dir=head_dirs[fmt], device="cuda").generate(PROMPTS, params)
    expected = make_engine(model_dir=reference, device="cuda").generate(PROMPTS, params)
    assert [o.token_ids for o in quantized] == [o.token_ids for o in expected]


@pytest.mark.parametrize("fmt", ["gptq", "int8"])
def test_vocab_parallel_ranks_hold_their_rows_of_the_quantized_head(fmt, head_dirs):
    full = build_model(head_dirs[fmt]).lm_head.quantized.dequantize()
    for rank in range(2):
        part = build_model(head_dirs[fmt], ParallelContext(tp_rank=rank, tp_size=2))
        assert torch.equal(part.lm_head.quantized.dequantize(), full.chunk(2)[rank])


@pytest.mark.parametrize("fmt", ["gptq", "int8"])
def test_a_vocab_tp_does_not_divide_is_padded_on_the_last_rank(fmt):
    """40 rows over 3 ranks: 14 a rank (42 padded), the last holds 12 and pads its logits,
    as the dense head's zero rows do; the ranks' logits side by side are the full head's."""
    vocab, hidden = 40, 32
    weight = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(0))
    tensors = FORMATS[fmt].write(weight, 16, None)
    scheme = QuantScheme(fmt, 16, 1 if fmt == "gptq" else 0, lm_head=True)
    full = FORMATS[fmt].read(ProjectionTensors("lm_head", tensors, scheme, hidden, vocab))
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1))
    parts = []
    for rank in range(3):
        head = ParallelLMHead(vocab, hidden, ParallelContext(tp_rank=rank, tp_size=3))
        head.load_quantized(0, full)
        assert head.quantized.out_features == (12 if rank == 2 else 14)
        parts.append(head.local_logits(x))
    assert [p.shape[-1] for p in parts] == [14, 14, 14]
    assert torch.equal(parts[-1][:, 12:], torch.zeros(3, 2))
    torch.testing.assert_close(torch.cat(parts, -1)[:, :vocab], F.linear(x, full.dequantize()))


def test_tp2_over_gloo_gives_the_single_rank_logits(head_dirs, make_step, local_ray):
    """The real vocab-parallel path: two ranks (the second a Ray actor), each its half of the
    4-bit head, logits all-gathered over gloo."""
    from workers.actors.rank_group import RankGroup
    from workers.config import CacheConfig, EngineConfig
    from workers.engine.model_runner import ModelRunner
    from workers.engine.stage_driver import StageDriver

    config = EngineConfig(model=str(head_dirs["gptq"]), device="cpu",
                          cache=CacheConfig(block_size=4, num_blocks=8))
    steps = [make_step([(IDS[:9], 9, [5, 1, 3])], 4, "all"),
             make_step([(IDS[:10], 1, [5, 1, 3])], 4)]
    single = ModelRunner(config)
    expected = [single.execute(step) for step in steps]
    lost: list[str] = []
    tp_config = dataclasses.replace(config, tp_size=2)
    group = RankGroup(tp_config, on_lost=lost.append)
    try:
        runner = ModelRunner(tp_config, group.parallel)
        assert isinstance(runner.model.lm_head.quantized, Int4Weight)
        driver = StageDriver(runner, group)
        for step, want in zip(steps, expected, strict=True):
            torch.testing.assert_close(driver.execute(step), want, atol=1e-5, rtol=0)
    finally:
        group.close()
    assert lost == []


def test_a_quantized_head_with_tied_embeddings_is_refused(make_model_dir, head_dirs, tmp_path,
                                                          capsys):
    """vLLM skips a tied checkpoint's lm_head.* tensors (its head is the embedding), so a
    quantized head is never what it serves; kvrelay refuses, writing and loading alike."""
    tied = make_model_dir("tied")
    with pytest.raises(InvalidModelConfig, match="tie_word_embeddings") as error:
        quantize_checkpoint(str(tied), tmp_path / "tied-gptq", "gptq", 32, lm_head=True)
    assert error.value.field == "quantization_config.lm_head"
    model = build_model(quantize_checkpoint(str(tied), tmp_path / "tied-ok", "gptq", 32))
    assert model.lm_head.weight is model.embed_tokens.weight  # without --lm-head: tied, dense
    claimed = tmp_path / "claimed"
    claimed.mkdir()
    for file in head_dirs["gptq"].iterdir():
        (claimed / file.name).write_bytes(file.read_bytes())
    config = json.loads((claimed / "config.json").read_text())
    (claimed / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(InvalidModelConfig, match="quantization_config.lm_head"):
        build_model(claimed)
    from cluster.serve import main as serve

    assert serve(["--model", str(claimed), "--port", "1"]) == 2  # before Ray: one line
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "'quantization_config.lm_head'" in err[0], err


@pytest.mark.parametrize(("fmt", "suffix", "label"), [
    ("gptq", "scales", "GPTQ 4-bit, group size 32"),
    ("int8", "weight_scale", "INT8 per-channel"),
])
def test_a_claimed_quantized_head_missing_a_tensor_fails_naming_it(fmt, suffix, label,
                                                                   head_dirs, tmp_path):
    folder = tmp_path / fmt
    folder.mkdir()
    for file in head_dirs[fmt].iterdir():
        if file.suffix != ".safetensors":
            (folder / file.name).write_bytes(file.read_bytes())
    stored = load_file(str(head_dirs[fmt] / "model.safetensors"))
    del stored[f"lm_head.{suffix}"]
    save_file(stored, str(folder / "model.safetensors"))
    with pytest.raises(InvalidTensor, match=f"lm_head.{suffix}.*no such tensor") as error:
        build_model(folder)
    assert error.value.name == f"lm_head.{suffix}" and label in error.value.format


@pytest.mark.parametrize(("targets", "ignore", "quantized"), [
    (["Linear"], ["lm_head"], False),
    (["Linear"], [], True),
    (["Linear"], ["re:.*lm_head$"], False),
    (["re:.*proj$"], [], False),
    (["re:.*proj$", "lm_head"], [], True),
])
def test_compressed_tensors_head_follows_targets_and_ignore(targets, ignore, quantized):
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    raw = {"quant_method": "compressed-tensors", "format": "naive-quantized", "ignore": ignore,
           "config_groups": {"group_0": {"targets": targets, "weights": weights}}}
    assert parse_scheme(raw).lm_head is quantized


def test_gptq_and_awq_read_the_lm_head_flag():
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
    assert not parse_scheme(gptq).lm_head
    assert parse_scheme({**gptq, "lm_head": True}).lm_head
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
           "version": "gemm"}
    assert not parse_scheme(awq).lm_head and parse_scheme({**awq, "lm_head": True}).lm_head
    with pytest.raises(InvalidModelConfig, match="lm_head"):
        parse_scheme({**gptq, "lm_head": "yes"})


def test_quantize_and_generate_commands_with_a_quantized_head(tiny_model_dir, make_model_dir,
                                                              tmp_path, capsys):
    """`kvrelay quantize --lm-head` (GPTQ with act-order: the head's input rows reordered too),
    then `kvrelay generate`: the same text as the dequantized checkpoint's; a tied model or a
    missing --format is refused by the command."""
    from cluster.cli import main as kvrelay
    from workers import generate_cli

    out = tmp_path / "gptq-head"
    argv = ["quantize", "--model", str(tiny_model_dir), "--out", str(out), "--format", "gptq",
            "--group-size", "32", "--act-order", "--lm-head"]
    assert kvrelay(argv) == 0
    assert "weights and LM head (round-to-nearest)" in capsys.readouterr().out
    assert build_model(out).lm_head.quantized.perm is not None
    texts = []
    for model in (out, dequantized_copy(out, tmp_path / "dequantized")):
        assert generate_cli.main(["--model", str(model), "--prompt", "Once upon a time",
                                  "--max-tokens", "12", "--device", "cpu",
                                  "--num-blocks", "16"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    tied = ["quantize", "--model", str(make_model_dir("tied")), "--out", str(tmp_path / "t"),
            "--format", "int8", "--lm-head"]
    assert kvrelay(tied) == 2
    err = capsys.readouterr().err
    assert "'quantization_config.lm_head'" in err and "tie_word_embeddings" in err
    with pytest.raises(SystemExit):
        kvrelay(argv[:5] + ["--lm-head"])


def test_a_4bit_head_needs_a_vocab_multiple_of_8(tiny_model_dir, tmp_path):
    """GPTQ/AWQ pack 8 output rows per int32 word of qzeros: a vocabulary of 508 cannot be
    written (said before anything is written); INT8 per channel can."""
    source = tmp_path / "v508"
    source.mkdir()
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:508].contiguous()
    save_file(tensors, str(source / "model.safetensors"))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vocab_size": 508}))
    with pytest.raises(InvalidModelConfig, match="508 is not a multiple of 8") as error:
        quantize_checkpoint(str(source), tmp_path / "awq", "awq", 32, lm_head=True)
    assert error.value.field == "vocab_size" and not (tmp_path / "awq").exists()
    int8 = build_model(quantize_checkpoint(str(source), tmp_path / "int8", "int8", lm_head=True))
    assert int8.lm_head.quantized.out_features == 508
