"""1P+1D on one GPU: TTFT, TPOT and KV transfer cost per request, Llama-3-8B shapes.

    python -m cluster.bench.bench_serve_1gpu                   # Llama-3-8B config, dummy bf16
    python -m cluster.bench.bench_serve_1gpu --prompt-len 4096 --num-requests 8 --concurrency 1

A prefill worker and a decode worker share the GPU (num_gpus=0.5 each); KV moves over CUDA IPC
by default (`auto`: two processes on one GPU have no NCCL link; `--kv-transport zmq` for the
host-staged path). Requests go straight to the Router actor and
tokens come back on a ZMQ PULL socket, as the gateway gets them, so HTTP and tokenization are
out of the numbers. Prints one table: per request TTFT, TPOT, transfer seconds and bytes and
the transfer's share of TTFT, plus the pair's start-up probe bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import ray
import torch
import zmq

from cluster.config import ClusterConfig
from cluster.launcher import launch
from router.router_state import RouterConfig
from workers.config import CacheConfig, EngineConfig
from workers.engine.sampling_params import SamplingParams
from workers.model.presets import resolve_config_path
from workers.protocol import GenerateRequest, decode


@dataclass
class Trace:
    sent: float
    token_times: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Collector:
    """The gateway's side of the token stream: one PULL socket, arrival time per token."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.PULL)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.traces: dict[str, Trace] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop:
            if not self.sock.poll(50):
                continue
            chunk = decode(self.sock.recv())
            now = time.perf_counter()
            trace = self.traces.get(chunk.request_id)
            if trace is None:
                continue
            trace.token_times += [now] * len(chunk.new_token_ids)
            if chunk.finished:
                trace.timings = chunk.timings
                trace.error = chunk.error
                trace.done.set()

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close(linger=0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=resolve_config_path, default=resolve_config_path("llama3-8b"),
                   help="config.json or a preset name (default: llama3-8b)")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--kv-cache-memory", type=int, default=8 << 30, help="bytes per worker")
    p.add_argument("--kv-transport", default="auto",
                   choices=["auto", "cuda_ipc", "zmq", "nccl", "gloo"],
                   help="auto: cuda_ipc on a GPU (both workers share it)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention-backend", default="triton", choices=["triton", "torch"])
    return p.parse_args(argv)


def cluster_config(args: argparse.Namespace, config_path: str) -> ClusterConfig:
    engine = EngineConfig(model=config_path, load_format="dummy", dtype=args.dtype,
                          attention_backend=args.attention_backend,
                          max_model_len=args.prompt_len + args.max_tokens + 16,
                          cache=CacheConfig(kv_cache_memory=args.kv_cache_memory))
    return ClusterConfig(engine=engine, model_name=Path(config_path).stem, name="bench",
                         num_prefill=1, num_decode=1, kv_transport=args.kv_transport,
                         gpu_share=True, router=RouterConfig(block_size=16))


def run_requests(cluster, collector: Collector, args, vocab: int, count: int) -> list[Trace]:
    """`count` requests, `args.concurrency` at a time; returns their traces."""
    gen = torch.Generator().manual_seed(0)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    traces = []
    for start in range(0, count, args.concurrency):
        wave = []
        for _ in range(min(args.concurrency, count - start)):
            rid = uuid.uuid4().hex
            prompt = torch.randint(10, vocab, (args.prompt_len,), generator=gen).tolist()
            trace = collector.traces[rid] = Trace(time.perf_counter())
            request = GenerateRequest(rid, prompt, sampling, collector.address,
                                      arrival_time=time.time())
            ray.get(cluster.router.submit.remote(request))
            wave.append(trace)
        for trace in wave:
            if not trace.done.wait(600):
                raise TimeoutError("a request did not finish in 600 s")
        traces += wave
    return traces


def report(args, traces: list[Trace], paths: dict, device: str, model: str) -> str:
    rows = []
    for t in traces:
        if t.error:
            raise RuntimeError(f"request failed: {t.error}")
        ttft = t.token_times[0] - t.sent
        tpot = (t.token_times[-1] - t.token_times[0]) / max(1, len(t.token_times) - 1)
        # Token 2 is the first the decode worker makes: it waits for the transfer.
        second = t.token_times[min(1, len(t.token_times) - 1)] - t.sent
        transfer = t.timings.get("kv_ready_delay", 0.0)
        rows.append((ttft, tpot, transfer, t.timings.get("transfer_bytes", 0.0),
                     t.timings.get("transfer_wire", 0.0), second))
    lines = [
        f"kvrelay 1P+1D on one GPU | {device} | {model} dummy {args.dtype} | "
        f"prompt {args.prompt_len} tok, {args.max_tokens} out, concurrency {args.concurrency} | "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
        "kv pair: " + ", ".join(f"{p['path']} probe {p['gbps'] or 0:.2f} GB/s"
                                for p in paths.values()),
        f"{'req':>4} {'TTFT ms':>9} {'TPOT ms':>9} {'xfer ms':>9} {'xfer MiB':>9} "
        f"{'wire GB/s':>9} {'xfer/TTFT':>9} {'tok2 ms':>9}",
    ]
    for i, (ttft, tpot, transfer, nbytes, wire, second) in enumerate(rows):
        gbps = nbytes / wire / 1e9 if wire else 0.0
        lines.append(f"{i:>4} {ttft * 1e3:>9.1f} {tpot * 1e3:>9.2f} {transfer * 1e3:>9.1f} "
                     f"{nbytes / 2**20:>9.1f} {gbps:>9.2f} {transfer / ttft:>9.1%} "
                     f"{second * 1e3:>9.1f}")
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    lines.append(f"{'med':>4} {med[0] * 1e3:>9.1f} {med[1] * 1e3:>9.2f} {med[2] * 1e3:>9.1f} "
                 f"{med[3] / 2**20:>9.1f} {'':>9} {med[2] / med[0]:>9.1%} "
                 f"{med[5] * 1e3:>9.1f}")
    lines.append("xfer: prefill worker's token 1 to KV landed on the decode worker; wire: the "
                 "data's own send time; tok2: arrival to token 2 (after the transfer)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config_path = args.config
    config = cluster_config(args, config_path)
    cluster = launch(config)
    collector = Collector()
    try:
        vocab = cluster.infos["prefill-0"]["vocab_size"]
        run_requests(cluster, collector, args, vocab, 1)  # warm-up: pair start, kernels
        traces = run_requests(cluster, collector, args, vocab, args.num_requests)
        paths = cluster.call("prefill-0", "transfer_paths")
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(report(args, traces, paths, device, Path(config_path).stem), flush=True)
    finally:
        collector.close()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
