"""Speculative decoding: TPOT with and without it, tokens per target step, and what the
verification step and a draft cost.

    python -m workers.bench.bench_spec --dummy-config llama3-8b --dtype bfloat16 \
        --attention-backend triton [--batch-sizes 1,8,32] [--k 4] [--input-len 256]
        [--output-len 64] [--draft-config config.json]

Random weights accept almost nothing from an unrelated draft, so the rows are:
- baseline: plain decode (CUDA graphs on CUDA);
- ngram: prompt lookup on prompts that repeat a phrase (a random-weight model's greedy output
  also tends to fall into cycles, which the lookup then predicts; the table shows the
  acceptance actually reached);
- self-draft: the target as its own draft (same dummy weights): acceptance 100%, the upper
  bound of what a draft can buy and the cost of drafting with a model that large;
- draft-small: a draft of the target's shape halved (hidden, heads, layers, MLP; a 1B-class
  model for Llama-3-8B, or --draft-config): its cost per step with ~0% acceptance.
TPOT per batch size = (time of O tokens - time of 1 token) / (O - 1), so prefill cancels.
Beside the table: one target forward of a verification step (1 + K tokens per sequence)
against a plain decode step (eager, and graphed where the engine graphs decode), a Medusa
tree verification step (1 + --tree-size tokens per sequence under the tree attention mask,
always eager: workers/spec/tree.py) against the chain's, and the draft's prefill of one
prompt against the target's (what the decode worker pays under disaggregation, where it
prefills the draft itself: workers/spec/factory.py).
Targets (issue 16): ngram batch-1 TPOT >= 2x lower on the repetitive workload; verify K=4
<= 1.3x a plain decode step at batch 1. Runs on CPU at tiny shapes (--dummy-config a tiny
config.json --device cpu).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

from workers.bench.bench_engine import _timed
from workers.bench.bench_report import device_name
from workers.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from workers.engine.sampling_params import SamplingParams
from workers.engine.step_input import StepInput
from workers.model.presets import resolve_config_path
from workers.spec.tree import ancestor_masks, build_tree, tree_positions

NCCL_BPS = 278e9
"""NCCL send/recv between two H200s at 16 MiB messages (DESIGN.md's performance budget)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_spec", description=__doc__.split("\n")[0])
    parser.add_argument("--dummy-config", type=resolve_config_path, required=True,
                        help="config.json or a preset name (llama3-8b): random weights")
    parser.add_argument("--draft-config", default=None,
                        help="the small draft's config.json (default: the target halved)")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attention-backend", default="torch", choices=["torch", "triton"])
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--kv-cache-memory", type=int, default=None,
                        help="bytes of target KV (the draft's cache has as many blocks); "
                             "default on CUDA 4 GiB, so a draft fits beside the target")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--methods", default="baseline,ngram,self-draft,draft-small")
    parser.add_argument("--tree-size", type=int, default=7,
                        help="nodes of the Medusa tree whose verification step is timed")
    return parser


def small_draft_config(target_config: str, folder: Path) -> str:
    """The target's config.json with hidden size, heads, kv heads, MLP and layers halved
    (head_dim kept): Llama-3-8B becomes a ~1.2B model (its 128k vocabulary dominates)."""
    config = json.loads(Path(target_config).read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        config[key] = max(1, config[key] // 2)
    config["num_key_value_heads"] = max(1, config.get("num_key_value_heads",
                                                      config["num_attention_heads"]) // 2)
    config["head_dim"] = head_dim
    path = folder / "draft-small.json"
    path.write_text(json.dumps(config))
    return str(path)


def repetitive_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """A random phrase of 16 tokens repeated to `length`: the continuation tends to repeat."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        phrase = [rng.randrange(min(4, vocab - 1), vocab) for _ in range(16)]
        prompts.append((phrase * (length // 16 + 1))[:length])
    return prompts


def engine_config(args: argparse.Namespace, max_batch: int,
                  speculative: SpeculativeConfig) -> EngineConfig:
    return EngineConfig(
        model=args.dummy_config, load_format="dummy", dtype=args.dtype, device=args.device,
        attention_backend=args.attention_backend, max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager,
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                          kv_cache_memory=args.kv_cache_memory,
                          enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max_batch,
                                  max_num_batched_tokens=max(8192, args.input_len)),
        speculative=speculative,
    )


def measure_tpot(engine, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """(TPOT seconds, target tokens per verification step) of one batch of prompts."""
    def run(n: int) -> None:
        engine.generate(prompts, SamplingParams(max_tokens=n, min_tokens=n, temperature=0))

    device = engine.runner.device
    run(2)  # warm-up
    before = dataclasses.replace(engine.spec.totals) if engine.spec else None
    full = min(_timed(lambda: run(output_len), device) for _ in range(2))
    one = min(_timed(lambda: run(1), device) for _ in range(2))
    per_step = 1.0
    if engine.spec is not None:
        drafts = engine.spec.totals.num_drafts - before.num_drafts
        accepted = engine.spec.totals.num_accepted_tokens - before.num_accepted_tokens
        per_step = 1 + accepted / drafts if drafts else 1.0
    return max(full - one, 0.0) / (output_len - 1), per_step


def verify_step_costs(engine, batch: int, context: int, k: int, tree_size: int
                      ) -> dict[str, float]:
    """Seconds of one target forward over `batch` sequences of `context` tokens in the
    engine's own cache: a decode step (1 token per sequence), a verification step (1 + k
    tokens per sequence), each eager and, where the engine has the graphs, replayed, and a
    tree verification step (1 + the tree's nodes, tree-masked, eager)."""
    runner, bs = engine.runner, engine.runner.block_size
    tree = build_tree(k, tree_size)
    per_seq = -(-(context + max(k, tree.num_nodes) + 1) // bs)
    assert batch * per_seq <= runner.num_blocks, "--num-blocks/--kv-cache-memory too small"
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]

    def step(q: int, parents: list[int] | None = None) -> StepInput:
        ids, pos, slots, starts, lens, masks = [], [], [], [0], [], []
        for table in tables:
            for p in range(context - q, context):
                ids.append(5)
                slots.append(table[p // bs] * bs + p % bs)
            pos += (tree_positions(context - q, parents) if parents is not None
                    else range(context - q, context))
            masks += ancestor_masks(parents) if parents is not None else []
            starts.append(len(ids))
            lens.append(context)
        return StepInput([str(i) for i in range(batch)], ids, pos, slots, starts, lens,
                         [list(t) for t in tables], list(range(len(ids))), masks or None)

    def timed(s: StepInput) -> float:
        runner.execute(s)
        return min(_timed(lambda: runner.execute(s), runner.device) for _ in range(5))

    decode, verify = step(1), step(1 + k)
    costs = {"tree_eager": timed(step(1 + tree.num_nodes, list(tree.parents)))}
    if runner.graph_runner is not None:
        costs["decode_graph"] = timed(decode)
    if runner.verify_graph_runner is not None:
        costs["verify_graph"] = timed(verify)
    graphs = runner.graph_runner, runner.verify_graph_runner
    runner.graph_runner = runner.verify_graph_runner = None
    costs["decode_eager"], costs["verify_eager"] = timed(decode), timed(verify)
    runner.graph_runner, runner.verify_graph_runner = graphs
    return costs


def cost_line(batch: int, k: int, costs: dict[str, float]) -> str:
    decode = costs.get("decode_graph", costs["decode_eager"])
    verify = costs.get("verify_graph", costs["verify_eager"])
    mode = "graphs" if "verify_graph" in costs else "eager"
    return (f"batch {batch:>3}: decode step {decode * 1e3:7.2f} ms, verify 1+{k} tokens "
            f"{verify * 1e3:7.2f} ms = {verify / decode:.2f}x ({mode}; eager "
            f"{costs['decode_eager'] * 1e3:.2f} / {costs['verify_eager'] * 1e3:.2f} ms)")


def tree_cost_line(batch: int, k: int, tree_size: int, costs: dict[str, float]) -> str:
    chain = costs.get("verify_graph", costs["verify_eager"])
    nodes = build_tree(k, tree_size).num_nodes
    return (f"batch {batch:>3}: medusa tree 1+{nodes} tokens (eager, tree mask) "
            f"{costs['tree_eager'] * 1e3:7.2f} ms = {costs['tree_eager'] / chain:.2f}x the "
            f"chain's 1+{k} verify, {costs['tree_eager'] / costs['verify_eager']:.2f}x its "
            "eager one")


def prefill_cost(runner, length: int) -> float:
    """Seconds of one prompt's prefill in `runner` (blocks from 0)."""
    bs = runner.block_size
    slots = list(range(length))
    step = StepInput(["p"], [5] * length, list(range(length)), slots, [0, length], [length],
                     [list(range(-(-length // bs)))], [length - 1])
    runner.execute(step)
    return min(_timed(lambda: runner.execute(step), runner.device) for _ in range(3))


def main(argv: list[str]) -> int:
    from workers.engine.engine import LLMEngine

    args = build_parser().parse_args(argv)
    if args.kv_cache_memory is None and args.num_blocks is None and torch.cuda.is_available():
        args.kv_cache_memory = 4 * 2**30
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    methods = args.methods.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    draft_small = args.draft_config or small_draft_config(args.dummy_config, workdir)
    spec_of = {
        "baseline": SpeculativeConfig(),
        "ngram": SpeculativeConfig("ngram", args.k),
        "self-draft": SpeculativeConfig("draft", args.k, args.dummy_config),
        "draft-small": SpeculativeConfig("draft", args.k, draft_small),
    }
    rows, extra, device = [], [], None
    for method in methods:
        engine = LLMEngine(engine_config(args, max(sizes), spec_of[method]))
        device = engine.runner.device
        vocab = engine.model_config.vocab_size
        for batch in sizes:
            prompts = repetitive_prompts(batch, args.input_len, vocab, seed=batch)
            tpot, per_step = measure_tpot(engine, prompts, args.output_len)
            rows.append((batch, method, tpot, per_step))
        # The first speculating target (it has the verify graphs) times the verify steps:
        # --methods ngram alone measures them without loading a second model.
        if method == next((m for m in methods if m in ("ngram", "self-draft")), None):
            tree_lines = []
            for batch in sizes:
                costs = verify_step_costs(engine, batch, args.input_len, args.k, args.tree_size)
                extra.append(cost_line(batch, args.k, costs))
                tree_lines.append(tree_cost_line(batch, args.k, args.tree_size, costs))
            extra += tree_lines
        if method == "baseline":
            target_prefill = prefill_cost(engine.runner, args.input_len)
        if method == "draft-small":
            draft = engine.spec.proposer.runner
            draft_prefill = prefill_cost(draft, args.input_len)
            extra.append(f"prefill of {args.input_len} tokens: draft-small "
                         f"{draft_prefill * 1e3:.2f} ms (decode worker, once per request)"
                         + (f" vs target {target_prefill * 1e3:.2f} ms"
                            if "baseline" in methods else ""))
            kv = draft.kv_bytes_per_block * args.input_len / draft.block_size
            extra.append(f"the alternative, shipping the draft's KV from the prefill worker: "
                         f"{kv / 2**20:.3f} MiB per request, {kv / NCCL_BPS * 1e6:.1f} us at "
                         f"{NCCL_BPS / 1e9:.0f} GB/s (NCCL, DESIGN.md) plus a draft on every "
                         "prefill worker and a second KV layout in the handshake")
        del engine  # before the next one loads: two 8B models need not coexist
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(format_table(args, device, rows, extra))
    return 0


def format_table(args: argparse.Namespace, device: torch.device,
                 rows: list[tuple[int, str, float, float]], extra: list[str]) -> str:
    baseline = {b: t for b, m, t, _ in rows if m == "baseline"}
    lines = [
        f"device:    {device_name(device)}",
        f"model:     {args.dummy_config} (dummy weights)   dtype: {args.dtype}   attention: "
        f"{args.attention_backend}   K: {args.k}",
        f"workload:  repetitive prompts of {args.input_len} tokens -> {args.output_len} "
        "output tokens (greedy)",
        f"date:      {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "",
        *extra,
        "",
        f"{'batch':>5}  {'method':<12}{'TPOT ms':>10}{'tok/step':>10}{'vs baseline':>13}",
    ]
    for batch, method, tpot, per_step in rows:
        ratio = f"{baseline[batch] / tpot:.2f}x" if batch in baseline and tpot > 0 else "-"
        lines.append(f"{batch:>5}  {method:<12}{tpot * 1e3:>10.2f}{per_step:>10.2f}{ratio:>13}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
