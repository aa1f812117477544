"""Offline engine throughput, with transformers `generate` as the baseline beside it.

    python -m workers.bench.bench_engine --model DIR | --dummy-config config.json|llama3-8b
        [--dtype D] [--attention-backend torch|triton] [--num-prompts N]
        [--input-len I] [--output-len O] [--hf-baseline]

N random prompts of exactly I tokens each produce exactly O tokens (greedy, EOS banned on
both sides, so the work is identical). With --hf-baseline, transformers runs first (batched
`generate`, same weights: the checkpoint, or our dummy init copied in) and is freed before
the engine sizes its KV cache. Prints one table: device, model, dtype, workload, date,
output tok/s, prompts/s, total tok/s, ratio to the baseline, and how many greedy outputs
match the baseline token for token. Above the throughput rows, decode-only figures per system:
TPOT (ms per step) at batch 1 from (time of O tokens - time of 1 token) / (O - 1), and the
bandwidth that step achieves (weights read + the batch's KV, over TPOT) against a device copy
measured in the same call (DESIGN.md: batch-1 decode is memory-bound).

Llama-3-8B shapes with random weights: `--dummy-config llama3-8b
--dtype bfloat16 --max-model-len 8192`. The engine uses CUDA graphs for decode on CUDA
unless `--enforce-eager`.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kernels.bench.bandwidth import copy_bandwidth
from workers.bench.bench_report import BenchResult, format_table
from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.model.presets import resolve_config_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvrelay bench-engine", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder")
    source.add_argument("--dummy-config", type=resolve_config_path,
                        help="config.json or a preset name (llama3-8b): random weights")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention-backend", default="torch", choices=["torch", "triton"])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--num-blocks", type=int, default=None, help="fix the KV pool size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--hf-baseline", action="store_true", help="also time transformers")
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model or args.dummy_config,
        load_format="dummy" if args.dummy_config else "auto",
        dtype=args.dtype,
        device=args.device,
        attention_backend=args.attention_backend,
        seed=args.seed,
        max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=max(args.max_num_batched_tokens, args.input_len),
        ),
    )


def make_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the lowest ids: tiny vocabularies keep their special tokens there.
    return [
        [rng.randrange(min(4, vocab_size - 1), vocab_size) for _ in range(length)]
        for _ in range(num)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def batch1_tpot(
    generate_one: Callable[[int], object], output_len: int, device: torch.device
) -> float | None:
    """Seconds per decode step of one sequence: (O tokens - 1 token) / (O - 1), best of a
    few runs each, so prefill and fixed costs cancel."""
    if output_len < 2:
        return None
    one = min(_timed(lambda: generate_one(1), device) for _ in range(3))
    full = min(_timed(lambda: generate_one(output_len), device) for _ in range(2))
    return max(full - one, 0.0) / (output_len - 1)


def decode_step_bytes(model: torch.nn.Module, context: int) -> int:
    """Bytes a batch-1 decode step reads: every weight except the input embedding (one row
    of it; unless tied to the head) plus K and V of `context` tokens in every layer."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if not cfg.tie_word_embeddings:
        embedding = model.embed_tokens.weight
        weights -= embedding.numel() * embedding.element_size()
    itemsize = next(model.parameters()).element_size()
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize * context
    return weights + kv


def run_engine(config: EngineConfig, prompts: list[list[int]], output_len: int) -> BenchResult:
    from workers.engine.engine import LLMEngine
    from workers.engine.sampling_params import SamplingParams

    engine = LLMEngine(config)

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, min_tokens=n, temperature=0)

    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    device = engine.runner.device
    _sync(device)
    start = time.perf_counter()
    outputs = engine.generate(prompts, greedy(output_len))
    _sync(device)
    seconds = time.perf_counter() - start
    tpot = batch1_tpot(lambda n: engine.generate([prompts[0]], greedy(n)), output_len, device)
    context = len(prompts[0]) + output_len // 2
    result = BenchResult(
        "kvrelay", seconds, [o.token_ids for o in outputs], tpot,
        decode_step_bytes(engine.runner.model, context), engine.runner.graph_runner is not None,
    )
    return result


def hf_model(config: EngineConfig, device: torch.device, dtype: torch.dtype):
    """transformers' model on the same weights as the engine (checkpoint or dummy init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.load_format != "dummy":
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
        return model.to(device).eval()
    from workers.attention.torch_backend import TorchAttentionBackend
    from workers.model.config import ModelConfig
    from workers.model.llama import LlamaForCausalLM
    from workers.model.weights import random_tensors

    hf_config = AutoConfig.from_pretrained(str(Path(config.model)))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    with torch.device("meta"):
        ours = LlamaForCausalLM(ModelConfig.from_path(config.model), TorchAttentionBackend())
    params = dict(model.named_parameters())  # tied weights appear once
    with torch.no_grad():
        for name, tensor in random_tensors(ours, config.seed, std=0.02, device=device):
            params.pop(name).copy_(tensor)  # same seed and std as workers.model.weights.load_dummy
    if params:
        raise RuntimeError(f"dummy init left transformers parameters untouched: {sorted(params)}")
    return model.eval()


def hf_generate(model, ids: torch.Tensor, num_new: int) -> torch.Tensor:
    """Batched greedy generation of exactly `num_new` tokens (no padding: equal lengths)."""
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=num_new,
            min_new_tokens=num_new,
            pad_token_id=eos[0] if isinstance(eos, list) else eos,
        )


def _hf_tpot(model, input_ids: torch.Tensor, output_len: int, device: torch.device):
    return batch1_tpot(lambda n: hf_generate(model, input_ids, n), output_len, device)


def run_hf(config: EngineConfig, prompts: list[list[int]], output_len: int) -> BenchResult:
    from workers.engine.model_runner import resolve_device, resolve_dtype
    from workers.model.config import ModelConfig

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, ModelConfig.from_path(config.model), device)
    model = hf_model(config, device, dtype)
    input_ids = torch.tensor(prompts, device=device)

    hf_generate(model, input_ids[:1, :8], 2)  # warm-up
    _sync(device)
    start = time.perf_counter()
    out = hf_generate(model, input_ids, output_len)
    _sync(device)
    seconds = time.perf_counter() - start
    tpot = _hf_tpot(model, input_ids[:1], output_len, device)
    result = BenchResult("transformers", seconds, out[:, input_ids.shape[1] :].tolist(), tpot)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = engine_config(args)
    from workers.engine.model_runner import resolve_device, resolve_dtype
    from workers.model.config import ModelConfig

    model_config = ModelConfig.from_path(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, model_config, device)
    prompts = make_prompts(args.num_prompts, args.input_len, model_config.vocab_size, args.seed)
    copy_bps = copy_bandwidth(device, 2**30) if device.type == "cuda" else None
    results = []
    if args.hf_baseline:
        results.append(run_hf(config, prompts, args.output_len))
    results.insert(0, run_engine(config, prompts, args.output_len))
    print(format_table(args, config, device, dtype, results, copy_bps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
