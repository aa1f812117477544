"""Tensor and pipeline parallel decode steps against one device, measured in one call.

    python -m workers.bench.bench_parallel --dummy-config llama3-8b --dtype bfloat16 \\
        --attention-backend triton [--batches 1,32] [--pp-batch 256] [--context 1024]
    python -m workers.bench.bench_parallel --tiny          # CPU, gloo, tiny shapes: a check

Every configuration runs the product's path: ModelRunner shards built with the worker's
group (workers/actors/rank_group.py: join_group; the driver's StageDriver hands each step
to the other ranks over a StepBroadcast; CUDA graphs where the runner uses them), one
process per rank (spawned here, no Ray), dummy weights. Rows:
- decode step at TP=1 and TP=2 for each batch: ms per step (driver's host waits for the
  logits, as the engine does before sampling), ratio to TP=1 (target at batch 1: <= 0.6),
  and the all-reduce share: the step's collectives (2 per layer, the embedding's and the
  logits' gather) timed alone at the same shapes, over the step time;
- PP=2 at a large batch: output tokens/s against one GPU at --pp-batch (target >= 1.8).
  Each stage holds half the layers, so the two GPUs hold the KV of 2 x --pp-batch sequences
  in the same memory per GPU; they run the way the engine runs them
  (workers/engine/micro_batches.py): two micro-batches of --pp-batch disjoint sequences,
  kept in flight with `submit`/`collect` so stage 0 runs one while stage 1 runs the other,
  each collected micro-batch's logits read on the host (as the sampler does) before the
  next is submitted; and, for contrast, all of them as one batch stepping through the
  stages in turn ("serial").
Prints one table with device, model, dtype and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.engine.step_input import StepInput
from workers.model.config import ModelConfig
from workers.model.presets import resolve_config_path

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 4096, "rope_scaling": None, "torch_dtype": "float32"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_parallel", description=__doc__.splitlines()[0])
    p.add_argument("--dummy-config", type=resolve_config_path, default=None,
                   help="config.json or a preset name (default llama3-8b)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU over gloo")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention-backend", default="triton", choices=["torch", "triton"])
    p.add_argument("--batches", default="1,32")
    p.add_argument("--pp-batch", type=int, default=256,
                   help="the one-GPU batch; PP=2 runs one micro-batch this large per stage")
    p.add_argument("--context", type=int, default=1024, help="tokens before each decode step")
    p.add_argument("--steps", type=int, default=30, help="timed steps per row")
    p.add_argument("--block-size", type=int, default=16)
    return p.parse_args(argv)


def bench_config(args: argparse.Namespace, folder: str, max_seqs: int) -> EngineConfig:
    """Dummy-weight engine config; --tiny writes a small Llama config.json into `folder`."""
    if args.tiny:
        base = json.loads(open(resolve_config_path("llama3-8b")).read())
        path = os.path.join(folder, "config.json")
        with open(path, "w") as out:
            json.dump({**base, **TINY}, out)
        device, dtype, backend = "cpu", "float32", "torch"
    else:
        path = args.dummy_config or resolve_config_path("llama3-8b")
        device, dtype, backend = "cuda", args.dtype, args.attention_backend
    blocks_per_seq = -(-(args.context + 1) // args.block_size)
    return EngineConfig(
        model=path, load_format="dummy", dtype=dtype, device=device,
        attention_backend=backend, max_model_len=args.context + args.block_size,
        cache=CacheConfig(block_size=args.block_size, num_blocks=max_seqs * blocks_per_seq),
        scheduler=SchedulerConfig(max_num_seqs=max_seqs),
    )


def decode_step(batch: int, context: int, block_size: int) -> StepInput:
    """`batch` sequences of `context` cached tokens each decoding one token."""
    per_seq = -(-(context + 1) // block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    slots = [table[context // block_size] * block_size + context % block_size
             for table in tables]
    return StepInput(
        seq_ids=[str(i) for i in range(batch)], token_ids=[7 + i % 100 for i in range(batch)],
        positions=[context] * batch, slot_mapping=slots,
        query_start_loc=list(range(batch + 1)), seq_lens=[context + 1] * batch,
        block_tables=tables, logits_indices=list(range(batch)),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(driver, step: StepInput, steps: int) -> float:
    """Median seconds of one driver step (logits on the driver, host synchronized)."""
    for _ in range(3):
        driver.execute(step)
    _sync(driver.runner.device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = driver.execute(step)
        logits.sum().item()  # the engine's sampler waits on the logits like this
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def split_step(step: StepInput, parts: int) -> list[StepInput]:
    """`step` (one decode token per sequence) as `parts` steps of disjoint sequences."""
    size = -(-step.num_seqs // parts)
    out = []
    for start in range(0, step.num_seqs, size):
        rows = slice(start, min(start + size, step.num_seqs))
        n = rows.stop - rows.start
        out.append(StepInput(
            seq_ids=step.seq_ids[rows], token_ids=step.token_ids[rows],
            positions=step.positions[rows], slot_mapping=step.slot_mapping[rows],
            query_start_loc=list(range(n + 1)), seq_lens=step.seq_lens[rows],
            block_tables=step.block_tables[rows], logits_indices=list(range(n))))
    return out


def _time_micro_batches(driver, step: StepInput, steps: int) -> float:
    """Median seconds per whole batch when its micro-batches (one per stage) stay in flight:
    submit the next, collect the oldest and read its logits, as the engine's loop does."""
    micro = split_step(step, driver.pipeline_depth)
    rounds = []
    driver.submit(micro[0])
    for i in range(1, (steps + 4) * len(micro) + 1):
        if i % len(micro) == 0:
            rounds.append(time.perf_counter())
        driver.submit(micro[i % len(micro)])
        driver.collect().sum().item()
    driver.collect().sum().item()
    per_round = [b - a for a, b in zip(rounds[3:], rounds[4:], strict=False)]
    return statistics.median(per_round)


def _collectives_alone(runner, batch: int, steps: int) -> float:
    """Median seconds of one step's TP collectives at its shapes, run alone."""
    cfg, parallel = runner.model_config, runner.parallel
    hidden = torch.zeros(batch, cfg.hidden_size, dtype=runner.dtype, device=runner.device)
    logits = torch.zeros(batch, -(-cfg.vocab_size // parallel.tp_size), device=runner.device)
    times = []
    for i in range(steps + 3):
        _sync(runner.device)
        start = time.perf_counter()
        for _ in range(2 * cfg.num_layers + 1):
            parallel.tp_all_reduce(hidden)
        parallel.tp_all_gather_last_dim(logits)
        _sync(runner.device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _build(rank: int, world: int, config: EngineConfig, port: int):
    """This rank's ModelRunner in its group (as a worker's rank builds it) and the channel."""
    from torch.distributed import TCPStore

    from workers.actors.rank_group import Rendezvous, group_backend, join_group
    from workers.actors.step_broadcast import StepBroadcast
    from workers.engine.model_runner import ModelRunner, resolve_device

    if config.device == "cuda":
        config = dataclasses.replace(config, device=f"cuda:{rank}")
    if world == 1:  # the product's one-process worker: no group, no broadcast
        return ModelRunner(config), None
    device = resolve_device(config.device)
    store = TCPStore("127.0.0.1", port, world, rank == 0,
                     timeout=datetime.timedelta(seconds=300), wait_for_workers=False)
    parallel = join_group(config, Rendezvous("127.0.0.1", port, world, group_backend(device)),
                          rank, store)
    channel = StepBroadcast()
    return ModelRunner(config, parallel), channel


def _rank_entry(rank: int, world: int, config: EngineConfig, batches: list[int], args,
                result_path: str, port: int) -> None:
    """Rank 0 times the steps (the others follow its broadcast), then every TP rank times
    the collectives alone; rank 0 writes the result."""
    from workers.actors.rank_group import leave_group
    from workers.engine.stage_driver import StageDriver

    runner, channel = _build(rank, world, config, port)
    rows = []
    if rank == 0:
        driver = StageDriver(runner, channel)
        for batch in batches:
            step = decode_step(batch, args.context, args.block_size)
            rows.append({"batch": batch, "step_s": _time_steps(driver, step, args.steps)})
            if config.pp_size > 1:
                rows.append({"batch": batch, "step_s": _time_micro_batches(
                    driver, step, args.steps), "micro_batches": driver.pipeline_depth})
        if channel is not None:
            channel.stop()
    else:
        while (step := channel.recv()) is not None:
            runner.run_pipeline(step)
    if config.tp_size > 1:
        for i, batch in enumerate(batches):
            seconds = _collectives_alone(runner, batch, args.steps)
            if rank == 0:
                rows[i]["collective_s"] = seconds
    graphs = runner.graph_runner is not None  # before close, which drops the runner
    runner.close()  # its CUDA graphs go before the group (CudaGraphRunner.close)
    leave_group()  # a no-op for the one-process row
    if rank == 0:
        with open(result_path, "w") as out:
            json.dump({"rows": rows, "graphs": graphs}, out)


def run_group(config: EngineConfig, tp: int, pp: int, batches: list[int], args) -> dict:
    """Spawns tp x pp rank processes running `batches`; returns rank 0's measurements."""
    config = dataclasses.replace(config, tp_size=tp, pp_size=pp)
    with tempfile.TemporaryDirectory() as folder:
        result = os.path.join(folder, "result.json")
        mp.start_processes(_rank_entry,
                           args=(tp * pp, config, batches, args, result, _free_port()),
                           nprocs=tp * pp, join=True, start_method="spawn")
        with open(result) as f:
            return json.load(f)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _device_name(tiny: bool) -> str:
    if tiny or not torch.cuda.is_available():
        return "cpu"
    return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        decode_config = bench_config(args, folder, max(batches))
        one_config = bench_config(args, folder, args.pp_batch)
        # Each stage holds half the layers, so two GPUs hold the KV of twice the sequences:
        # one micro-batch per stage, each as large as the one-GPU batch.
        pp_config = bench_config(args, folder, 2 * args.pp_batch)
        tp1 = run_group(decode_config, 1, 1, batches, args)
        tp2 = run_group(decode_config, 2, 1, batches, args)
        one = run_group(one_config, 1, 1, [args.pp_batch], args)
        pp2 = run_group(pp_config, 1, 2, [2 * args.pp_batch], args)
        model = ModelConfig.from_path(decode_config.model)
    name = "tiny" if args.tiny else os.path.basename(decode_config.model).removesuffix(".json")
    print(f"device {_device_name(args.tiny)} | model {name} dummy weights "
          f"({model.num_layers} layers, hidden {model.hidden_size}) | dtype "
          f"{decode_config.dtype} | attention {decode_config.attention_backend} | context "
          f"{args.context} | {datetime.date.today().isoformat()}")
    print(f"{'row':<26}{'batch':>6}{'ms/step':>10}{'tok/s':>10}{'ratio':>8}{'all-reduce':>12}"
          f"{'graphs':>8}")
    for base, row in zip(tp1["rows"], tp2["rows"], strict=True):
        _print_row("decode TP=1", base, base, tp1["graphs"])
        share = row["collective_s"] / row["step_s"]
        _print_row("decode TP=2", row, base, tp2["graphs"], f"{100 * share:.0f}%")
    _print_row("large batch, 1 device", one["rows"][0], one["rows"][0], one["graphs"])
    serial, micro = pp2["rows"]
    _print_row(f"large batch, PP=2 {micro['micro_batches']} mb", micro, one["rows"][0],
               pp2["graphs"])
    _print_row("large batch, PP=2 serial", serial, one["rows"][0], pp2["graphs"])
    print("targets: decode TP=2 batch 1 ratio <= 0.60; PP=2 tok/s ratio >= 1.80 "
          "(ratio: ms/step for decode rows, tok/s for the large-batch rows; PP=2 rows hold "
          "twice the 1-device batch in the same memory per GPU; mb: micro-batches in flight)")
    return 0


def _print_row(name: str, row: dict, base: dict, graphs: bool, share: str = "-") -> None:
    tokens = row["batch"] / row["step_s"]
    if name.startswith("decode"):
        ratio = row["step_s"] / base["step_s"]
    else:
        ratio = tokens / (base["batch"] / base["step_s"])
    print(f"{name:<26}{row['batch']:>6}{1e3 * row['step_s']:>10.2f}{tokens:>10.0f}"
          f"{ratio:>8.2f}{share:>12}{'yes' if graphs else 'no':>8}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
