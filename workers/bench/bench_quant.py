"""Decode speed of quantized weights: bf16 vs W8A16 (INT8) vs FP8 vs W4A16 (GPTQ layout) on
one model's shapes with dummy weights, through the engine (CUDA graphs for decode).

    python -m workers.bench.bench_quant [--config llama3-8b] [--formats bf16,int8,fp8,gptq,awq]
        [--input-len 128] [--output-len 64] [--batch 1 32] [--group-size 128]
        [--quantize-lm-head]
    python -m workers.bench.bench_quant --gguf smollm2      (a GGUF file's Q4_0/Q4_1
        projections dequantized to --dtype at load vs kept 4-bit: --quantization none / gguf)
    python -m workers.bench.bench_quant --formats bf16,fp8,fp8-load,int8-load
        (fp8-load / int8-load: the unquantized config served with --quantization fp8 / int8,
        quantized per output channel while loading; 'load s' is the engine's start-up)

--quantize-lm-head adds, for each quantized checkpoint format (int8, fp8, gptq, awq), a second
row with the LM head quantized in that format too (the config's lm_head flag, as
`kvrelay quantize --lm-head` writes it); the `lm head` column says which rows have it.

For each format a config.json (the preset plus that format's quantization_config) is loaded
with load_format='dummy': the projections are the same random weights, rounded to the format
(workers/model/weights.py load_dummy; the LM head too where the row says so) and kept
quantized. A decode step at batch B is timed as
(time of O tokens - time of 1 token) / (O - 1) for B prompts of I tokens, so prefill cancels;
batch 1 gives TPOT, batch 32 decode throughput (32 / step). Weight bytes are what one step
reads of the projections, norms and LM head; the "vs base" ratios (to bf16, or to the
dequantized GGUF) are of step times measured in this run. Targets (issue 14): W4A16
batch-1 step <= 0.4x bf16's, FP8 <= 0.6x.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from workers.bench.bench_engine import batch1_tpot, make_prompts
from workers.bench.bench_report import device_name
from workers.bench.profiling import print_profile
from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.model.model_source import resolve_model_path
from workers.model.presets import resolve_config_path
from workers.model.quantize import quantization_config

LABELS = {"bf16": "unquantized", "int8": "W8A16 int8", "fp8": "FP8 e4m3", "gptq": "W4A16 gptq",
          "awq": "W4A16 awq", "gguf": "GGUF dequant", "gguf-kept": "GGUF Q4 kept",
          "fp8-load": "FP8 at load", "int8-load": "INT8 at load"}
AT_LOAD = {"fp8-load": "fp8", "int8-load": "int8"}
"""Formats quantized while loading (--quantization) from the unquantized config."""
HEAD_FORMATS = ("int8", "fp8", "gptq", "awq")
"""Checkpoint formats whose config can say the LM head is quantized."""
HEAD_SUFFIX = "+head"
"""Row key suffix of a format measured with its LM head quantized ('gptq+head')."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workers.bench.bench_quant",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="llama3-8b", type=resolve_config_path,
                        help="config.json or preset name")
    parser.add_argument("--formats", default="bf16,int8,fp8,gptq")
    parser.add_argument("--gguf", default=None,
                        help="a GGUF file or packaged model (smollm2): dequantized vs kept 4-bit")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="also measure int8/fp8/gptq/awq with the LM head quantized")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention-backend", default="triton", choices=["torch", "triton"])
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print torch.profiler's kernel tables of each "
                             "format's batch-1 decode (--output-len tokens)")
    return parser


def format_config(base: dict, fmt: str, group_size: int, folder: Path,
                  lm_head: bool = False) -> str:
    config = dict(base)
    if fmt not in ("bf16", *AT_LOAD):
        config["quantization_config"] = quantization_config(fmt, group_size, False, lm_head)
    path = folder / f"{fmt}{HEAD_SUFFIX if lm_head else ''}.json"
    path.write_text(json.dumps(config))
    return str(path)


def step_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every parameter and quantized buffer but
    the input embedding (unless it is tied to the LM head)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    if not model.config.tie_word_embeddings and model.has_embedding:
        tensors.pop(id(model.embed_tokens.weight))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(args: argparse.Namespace, model_path: str, quantization: str = "auto"
            ) -> dict[str, float]:
    from workers.engine.engine import LLMEngine

    config = EngineConfig(
        model=model_path, load_format="auto" if args.gguf else "dummy",
        quantization=quantization, dtype=args.dtype, device=args.device,
        attention_backend=args.attention_backend, max_model_len=args.max_model_len,
        cache=CacheConfig(num_blocks=args.num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=max(args.batch),
                                  max_num_batched_tokens=max(args.batch) * args.input_len),
    )
    start = time.perf_counter()
    engine = LLMEngine(config)
    load_s = time.perf_counter() - start
    result = {**time_steps(engine, args), "load_s": load_s}
    device = engine.runner.device
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def time_steps(engine, args: argparse.Namespace) -> dict[str, float]:
    """Weight bytes and the decode step time at each batch size."""
    from workers.engine.sampling_params import SamplingParams

    vocab = engine.runner.model_config.vocab_size
    prompts = make_prompts(max(args.batch), args.input_len, vocab, seed=0)

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, min_tokens=n, temperature=0)

    engine.generate([prompts[0][:8]], greedy(2))  # warm-up
    result = {"weight_bytes": step_weight_bytes(engine.runner.model)}
    for batch in args.batch:
        result[f"step_{batch}"] = batch1_tpot(
            lambda n, b=batch: engine.generate(prompts[:b], greedy(n)), args.output_len,
            engine.runner.device,
        )
    graphs = engine.runner.graph_runner
    if graphs is not None and graphs.captured and 1 in args.batch:
        # The model's forward alone (no LM head, sampling or host work): what the GPU
        # spends per batch-1 step inside the graph; the rest of step_1 is around it.
        result["graph_1"] = min(graphs.replay_seconds(1) for _ in range(3))
    if args.profile:
        print_profile(lambda: engine.generate([prompts[0][:8]], greedy(args.output_len)),
                      f"batch-1 decode of {args.output_len} tokens "
                      f"({Path(engine.config.model).name}, quantization "
                      f"{engine.config.quantization})")
    return result


def format_table(args: argparse.Namespace, results: dict[str, dict[str, float]]) -> str:
    device = device_name(torch.device("cuda" if torch.cuda.is_available() and
                                      args.device in ("auto", "cuda") else "cpu"))
    lines = [
        f"device:    {device}",
        f"model:     {args.gguf or args.config} ({'GGUF file' if args.gguf else 'dummy weights'}),"
        f" activations {args.dtype}, "
        f"attention {args.attention_backend}, group size {args.group_size} (4-bit)",
        f"workload:  batch {args.batch} x {args.input_len} prompt tokens, decode step = "
        f"(t({args.output_len} tokens) - t(1)) / {args.output_len - 1}",
        f"date:      {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"torch {torch.__version__}",
        "",
    ]
    head = f"{'format':<13}{'lm head':>8}{'load s':>7}{'weights GB':>11}"
    for batch in args.batch:
        head += f"{f'b{batch} step ms':>13}{'vs base':>9}{f'b{batch} tok/s':>12}"
    head += f"{'b1 weight GB/s':>16}"
    graphed = all("graph_1" in r for r in results.values())
    if graphed:
        head += f"{'b1 graph ms':>13}{'b1 rest ms':>12}"
    lines.append(head)
    base = results.get("bf16") or results.get("gguf")
    for key, r in results.items():
        fmt = key.removesuffix(HEAD_SUFFIX)
        lm_head = "quant" if key.endswith(HEAD_SUFFIX) else "dense"
        row = f"{LABELS[fmt]:<13}{lm_head:>8}{r['load_s']:>7.1f}{r['weight_bytes'] / 1e9:>11.2f}"
        for batch in args.batch:
            # A step of 0 s: t(O tokens) came out below t(1) (noise; raise --output-len).
            step = r[f"step_{batch}"] or float("nan")
            base_step = base[f"step_{batch}"] or float("nan") if base else float("nan")
            row += f"{step * 1e3:>13.2f}{step / base_step:>8.2f}x{batch / step:>12.0f}"
        first = r[f"step_{args.batch[0]}"] or float("nan")
        row += f"{r['weight_bytes'] / first / 1e9:>16.0f}"
        if graphed:
            step_1 = r["step_1"] or float("nan")
            row += f"{r['graph_1'] * 1e3:>13.2f}{(step_1 - r['graph_1']) * 1e3:>12.2f}"
        lines.append(row)
    lines.append("")
    if graphed:
        lines.append("b1 graph ms: one replay of the batch-1 decode graph (the model's forward "
                     "on the GPU); b1 rest ms: the step around it (LM head, sampling, host)")
    lines.append("targets: W4A16 b1 step <= 0.40x bf16, FP8 b1 step <= 0.60x bf16")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    results = {}
    if args.gguf:
        path = resolve_model_path(args.gguf)
        results["gguf"] = measure(args, path, "none")
        results["gguf-kept"] = measure(args, path, "gguf")
        print(format_table(args, results))
        return 0
    base = json.loads(Path(args.config).read_text())
    with tempfile.TemporaryDirectory() as folder:
        for fmt in args.formats.split(","):
            heads = (False, True) if args.quantize_lm_head and fmt in HEAD_FORMATS else (False,)
            for lm_head in heads:
                key = fmt + (HEAD_SUFFIX if lm_head else "")
                config = format_config(base, fmt, args.group_size, Path(folder), lm_head)
                results[key] = measure(args, config, AT_LOAD.get(fmt, "auto"))
                print(f"{key}: {results[key]}", file=sys.stderr)
    print(format_table(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
