"""python -m cluster.bench.bench_prefix_cache: prefix caching on against off, one GPU.

Workload: `--num-requests` prompts of one shared `--shared-len`-token system prompt plus
`--unique-len` tokens of their own (token ids below the vocabulary: exact lengths, and what a
`--dummy-config` model can serve), `--output-len` greedy tokens each (EOS banned).
- Engine (colocated), caching off then on, each in a fresh engine after a warm-up: requests
  one at a time, TTFT (request added -> first token) p50/p99; with caching on, one request
  seeded the shared prefix first (a system prompt seen before, as in steady serving). Then
  all requests at once: seconds, output tok/s, total tok/s.
- 1 prefill + 1 decode worker in this process (`--kv-transport`, default zmq: two NCCL ranks
  cannot share one GPU), requests one at a time: KV bytes moved per request (the decode
  worker's count of what landed) and per uncached prompt token. With caching on, the
  decode worker holds the shared prefix after the first request, so later ones move only
  their own blocks.
Prints one table with device, model, date and the on/off ratios. Runs on CPU at tiny shapes
(`--device cpu --dummy-config <tiny config.json> --shared-len 64 --unique-len 8`).

Llama-3-8B shapes on one GPU: `--dummy-config llama3-8b --dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import random
import statistics
import time
from typing import Any

import torch
import zmq

from workers.actors.decode_worker import DecodeWorker
from workers.actors.prefill_worker import PrefillWorker
from workers.actors.worker_base import WorkerSpec
from workers.bench.bench_report import device_name
from workers.bench.profiling import print_profile
from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.model.presets import resolve_config_path
from workers.protocol import GenerateRequest, decode


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_prefix_cache", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder")
    source.add_argument("--dummy-config", type=resolve_config_path,
                        help="config.json or a preset name (llama3-8b): random weights")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--attention-backend", default="torch", choices=["torch", "triton"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--shared-len", type=int, default=2048)
    p.add_argument("--unique-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--kv-cache-memory", type=int, default=None,
                   help="bytes of KV cache per engine (default: 12 GiB on CUDA, 256 MiB on CPU)")
    p.add_argument("--kv-transport", default="zmq", choices=["zmq", "gloo", "cuda_ipc"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="with caching on, profile 4 more cached requests (one at a time) and "
                        "print where their TTFT goes: GPU kernels and host ops")
    return p.parse_args(argv)


def engine_config(args: argparse.Namespace, caching: bool) -> EngineConfig:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = args.kv_cache_memory or (12 << 30 if device.startswith("cuda") else 256 << 20)
    return EngineConfig(
        model=args.model or args.dummy_config,
        load_format="dummy" if args.dummy_config else "auto",
        dtype=args.dtype, device=device, attention_backend=args.attention_backend,
        seed=args.seed,
        max_model_len=args.shared_len + args.unique_len + args.output_len + args.block_size,
        cache=CacheConfig(block_size=args.block_size, kv_cache_memory=memory,
                          enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=max(
            8192, args.shared_len + args.unique_len)),
    )


def workload(args: argparse.Namespace, vocab: int, batches: int = 1) -> list[list[list[int]]]:
    """[[a seeding prompt], then `batches` lists of measured prompts]: one shared prefix,
    each prompt's tail its own."""
    rng = random.Random(args.seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    shared = ids(args.shared_len)
    return [[shared + ids(args.unique_len)]] + [
        [shared + ids(args.unique_len) for _ in range(args.num_requests)]
        for _ in range(batches)]


def params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.output_len, min_tokens=args.output_len,
                          temperature=0, ignore_eos=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def engine_run(args: argparse.Namespace, caching: bool) -> dict[str, Any]:
    """TTFTs one request at a time, then the batch's throughput, in a fresh engine."""
    engine = LLMEngine(engine_config(args, caching))
    (seed_prompt,), prompts, batch = workload(args, engine.model_config.vocab_size, 2)
    sampling = params(args)
    engine.generate([list(reversed(seed_prompt))], sampling)  # warm-up, shares nothing
    engine.generate([seed_prompt], sampling)  # the system prompt, seen before
    ttfts, cached = [], []
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        engine.add_request(f"ttft-{i}", prompt, sampling)
        first = None
        while engine.has_unfinished():
            outputs = engine.step()
            if first is None and outputs:
                first = time.perf_counter() - start
                cached.append(outputs[0].num_cached_tokens)
        ttfts.append(first)
    if caching and args.profile:
        profile_ttft(engine, prompts[:4], sampling)
    start = time.perf_counter()
    engine.generate(batch, sampling)  # new tails: only the shared prefix is cached
    seconds = time.perf_counter() - start
    result = {"ttft_p50": statistics.median(ttfts), "ttft_p99": percentile(ttfts, 0.99),
              "cached": statistics.mean(cached), "seconds": seconds,
              "out_tps": len(prompts) * args.output_len / seconds,
              "total_tps": len(prompts) * (len(prompts[0]) + args.output_len) / seconds,
              "model": engine.config.model, "dtype": str(engine.runner.dtype),
              "kv_dtype": str(engine.runner.kv_cache_dtype)}
    del engine
    release_memory()
    return result


def profile_ttft(engine: LLMEngine, prompts: list[list[int]], sampling: SamplingParams) -> None:
    """Prints torch.profiler's GPU-kernel and host-op tables over `prompts` served one at a
    time up to their first token (then aborted, so decode steps do not mix in)."""
    def run() -> None:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"profile-{i}", prompt, sampling)
            while not engine.step():
                pass
            engine.abort(f"profile-{i}")
            while engine.has_unfinished():
                engine.step()

    print_profile(run, f"{len(prompts)} cached TTFTs")


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def disagg_run(args: argparse.Namespace, caching: bool) -> dict[str, float]:
    """1P+1D in this process: KV bytes each request moved (decode worker's count)."""
    config = engine_config(args, caching)
    prefill = PrefillWorker(WorkerSpec("bench-prefill", config, kv_transport=args.kv_transport))
    decode_worker = DecodeWorker(WorkerSpec("bench-decode", config,
                                            kv_transport=args.kv_transport))
    context = zmq.Context.instance()
    sink = context.socket(zmq.PULL)
    address = f"tcp://127.0.0.1:{sink.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        prefill.connect([decode_worker.kv_address()])
        (seed_prompt,), prompts = workload(args, prefill.ready()["vocab_size"])
        moved = []
        for i, prompt in enumerate([seed_prompt, *prompts]):
            request = GenerateRequest(f"kv-{i}", prompt, params(args), address,
                                      arrival_time=time.time())
            prefill.prefill(request, decode_worker.reserve(request))
            final = wait_final(sink, request.request_id)
            if i > 0:
                moved.append(final.timings.get("transfer_bytes", 0.0))
        block_bytes = kv_block_bytes(decode_worker)
        mean = statistics.mean(moved)
        return {"bytes": mean, "blocks": mean / block_bytes,
                "uncached": mean / block_bytes * args.block_size}
    finally:
        sink.close(linger=0)
        prefill.shutdown()
        decode_worker.shutdown()
        del prefill, decode_worker
        release_memory()


def wait_final(sink: zmq.Socket, request_id: str, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sink.poll(100):
            chunk = decode(sink.recv())
            if getattr(chunk, "request_id", None) == request_id and chunk.finished:
                if chunk.finish_reason == "error":
                    raise RuntimeError(f"{request_id}: {chunk.error}")
                return chunk
    raise TimeoutError(f"{request_id}: no final chunk in {timeout_s} s")


def kv_block_bytes(worker) -> int:
    k_cache = worker.engine.kv_caches[0][0]
    return 2 * len(worker.engine.kv_caches) * k_cache[0].numel() * k_cache.element_size()


def format_table(args: argparse.Namespace, engine: dict[str, dict], kv: dict[str, dict],
                 device: str) -> str:
    off, on = engine["off"], engine["on"]
    prompt = args.shared_len + args.unique_len
    lines = [
        f"device:   {device}",
        f"model:    {on['model']} ({'dummy weights' if args.dummy_config else 'checkpoint'}), "
        f"dtype {on['dtype'].removeprefix('torch.')}, KV "
        f"{on['kv_dtype'].removeprefix('torch.')}, block size {args.block_size}",
        f"workload: {args.num_requests} requests x ({args.shared_len} shared + "
        f"{args.unique_len} unique tokens) -> {args.output_len} tokens (greedy)",
        f"date:     {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "",
        f"{'caching':<10}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'cached tok':>12}"
        f"{'batch s':>10}{'out tok/s':>11}{'total tok/s':>13}"
        f"{'KV KiB/req':>12}{'KV blocks/req':>15}",
    ]
    for name, row in (("off", off), ("on", on)):
        lines.append(
            f"{name:<10}{1e3 * row['ttft_p50']:>13.2f}{1e3 * row['ttft_p99']:>13.2f}"
            f"{row['cached']:>12.0f}{row['seconds']:>10.2f}{row['out_tps']:>11.1f}"
            f"{row['total_tps']:>13.1f}{kv[name]['bytes'] / 1024:>12.1f}"
            f"{kv[name]['blocks']:>15.1f}")
    lines += [
        "",
        f"TTFT off/on: p50 {off['ttft_p50'] / on['ttft_p50']:.2f}x, "
        f"p99 {off['ttft_p99'] / on['ttft_p99']:.2f}x (target >= 5x on the cached part); "
        f"throughput on/off {on['total_tps'] / off['total_tps']:.2f}x",
        f"KV moved per request (1P+1D, {args.kv_transport}): off/on "
        f"{kv['off']['bytes'] / max(1.0, kv['on']['bytes']):.2f}x; with caching on it covers "
        f"~{kv['on']['uncached']:.0f} tokens for {args.unique_len} uncached of {prompt} "
        f"(whole blocks: the tail block of the shared prefix and the unique tokens)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    engine = {name: engine_run(args, name == "on") for name in ("off", "on")}
    kv = {name: disagg_run(args, name == "on") for name in ("off", "on")}
    config = engine_config(args, True)
    table = format_table(args, engine, kv, device_name(torch.device(config.device)))
    print(table)
    return table


if __name__ == "__main__":
    main()
