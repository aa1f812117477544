"""python -m cluster.bench_disagg: disaggregated (1 prefill + 1 decode) against colocated (2).

For each mode it starts `kvrelay serve` (Ray, two GPUs), then
- sends `--requests` requests one at a time at each `--tokens` prompt length: TTFT and TPOT
  (client side, loadtest's definitions), the KV bytes and wire seconds of their transfers
  (the gateway's kv_transfer counters), GB/s beside raw send/recv of the same bytes between
  two processes (measured last, once the servers let go of the GPUs), and the transfer
  phase's share of TTFT;
- runs an open-loop load (`--load-requests` at `--rate` req/s, prompts `--load-input-len`)
  and reports goodput: requests per second that meet a strict TPOT SLO.
Runs on CPU too (`--device cpu`, a tiny model), which is how it is tested.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import torch

from cluster import bench_kv
from loadtest.arrival import ArrivalConfig
from loadtest.client import EndpointConfig
from loadtest.metrics import Summary, summarize
from loadtest.runner import RunConfig, run
from loadtest.slo import SLO, parse_slo
from loadtest.workload import LengthRange, Workload, WorkloadConfig
from workers.kv_transfer import KVLayout, plan_transfer
from workers.model.config import ModelConfig

MODEL_NAME = "bench"
MODES = {"disagg 1P+1D": ["--prefill", "1", "--decode", "1"], "colocated x2": ["--colocated", "2"]}


@dataclass(frozen=True)
class DisaggBenchConfig:
    model_args: tuple[str, ...]
    """--model DIR or --dummy-config FILE, as `kvrelay serve` takes them."""
    model_path: str
    device: str
    dtype: str
    tokens: tuple[int, ...]
    output_len: int
    requests: int
    load_requests: int
    load_input_len: str
    rate: float
    tpot_slo: SLO
    port: int
    startup_timeout_s: float
    extra_serve_args: tuple[str, ...]


def _parse(argv: list[str] | None) -> DisaggBenchConfig:
    p = argparse.ArgumentParser(prog="python -m cluster.bench_disagg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder")
    src.add_argument("--dummy-config", help="config.json: random weights of that shape")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--tokens", default="1024,4096,16384", help="prompt lengths")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--requests", type=int, default=4, help="sequential requests per length")
    p.add_argument("--load-requests", type=int, default=64)
    p.add_argument("--load-input-len", default="1024:4096", help="N or LO:HI tokens")
    p.add_argument("--rate", type=float, default=4.0, help="load: requests per second")
    p.add_argument("--tpot-slo", default="tpot=25ms")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("serve_args", nargs="*", help="more `kvrelay serve` flags (after --)")
    a = p.parse_args(argv)
    model_args = ("--model", a.model) if a.model else ("--dummy-config", a.dummy_config)
    return DisaggBenchConfig(
        model_args, a.model or a.dummy_config, a.device, a.dtype,
        tuple(int(t) for t in a.tokens.split(",")), a.output_len, a.requests,
        a.load_requests, a.load_input_len, a.rate, parse_slo(a.tpot_slo), a.port,
        a.startup_timeout, tuple(a.serve_args))


def model_layout(cfg: DisaggBenchConfig) -> KVLayout:
    """The served model's KV shape, for raw send/recv of the same bytes."""
    model = ModelConfig.from_path(cfg.model_path)
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = model.torch_dtype if cfg.device == "cuda" else "float32"
    return KVLayout(MODEL_NAME, dtype, 16, model.num_layers, model.num_kv_heads, model.head_dim)


def raw_baseline(cfg: DisaggBenchConfig, layout: KVLayout,
                 num_bytes: dict[int, float]) -> dict[int, float]:
    """GB/s of raw send/recv (NCCL on two GPUs, gloo on CPU) of the KV bytes each prompt
    length really moved (whole blocks of the served model), per prompt length."""
    per_token = plan_transfer(layout, layout).num_bytes(layout, 1) / layout.block_size
    slots = {t: round(b / per_token) for t, b in num_bytes.items() if b > 0}
    if not slots:
        return {}
    kv = bench_kv.BenchConfig(cfg.device, tuple(sorted(set(slots.values()))), iters=3, warmup=1,
                              layout=layout)
    devices = ("cuda:0", "cuda:1") if cfg.device == "cuda" else ("cpu", "cpu")
    raw = bench_kv.run_pair(kv, "torch", devices, raw=True)["raw"]
    return {t: raw[n] for t, n in slots.items()}


class Server:
    """`kvrelay serve` in a child process (own session, so its Ray workers stop with it)."""

    def __init__(self, cfg: DisaggBenchConfig, mode_args: list[str]):
        self.url = f"http://127.0.0.1:{cfg.port}"
        command = [sys.executable, "-m", "cluster.cli", "serve", *cfg.model_args,
                   "--served-model-name", MODEL_NAME, "--port", str(cfg.port),
                   "--device", cfg.device, "--dtype", cfg.dtype, *mode_args,
                   *cfg.extra_serve_args]
        self.process = subprocess.Popen(command, start_new_session=True)
        self._wait_ready(cfg.startup_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kvrelay serve exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"kvrelay serve not ready within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def scrape(url: str) -> dict[str, float]:
    """Cumulative KV transfer bytes and wire seconds, and the summed transfer phase."""
    totals = httpx.get(url + "/v1/metrics", timeout=10.0).json()
    text = httpx.get(url + "/metrics", timeout=10.0).text
    phase = re.search(r'^kvrelay_request_phase_seconds_sum\{phase="transfer"\} (\S+)$', text,
                      re.MULTILINE)
    return {"bytes": float(totals.get("kv_transfer_bytes", 0.0)),
            "wire_s": float(totals.get("kv_transfer_seconds", 0.0)),
            "phase_s": float(phase.group(1)) if phase else 0.0}


def _endpoint(url: str) -> EndpointConfig:
    return EndpointConfig(url, MODEL_NAME, ignore_eos=True, timeout_s=600.0)


def measure_length(cfg: DisaggBenchConfig, url: str, tokens: int) -> dict[str, float]:
    """Sequential requests of one prompt length: medians of TTFT/TPOT, mean transfer."""
    before = scrape(url)
    workload = Workload(WorkloadConfig("fixed", LengthRange(tokens, tokens),
                                       LengthRange(cfg.output_len, cfg.output_len)))
    result = run(RunConfig(_endpoint(url), ArrivalConfig("closed", concurrency=1),
                           num_requests=cfg.requests), workload)
    after = scrape(url)
    ok = [r for r in result.records if r.ok]
    if not ok:
        errors = {r.error for r in result.records}
        raise RuntimeError(f"no request of {tokens} tokens succeeded: {errors}")
    n = len(result.records)
    ttft = statistics.median(r.ttft for r in ok)
    delta = {k: (after[k] - before[k]) / n for k in after}
    return {"prompt_tokens": statistics.median(r.prompt_tokens for r in ok), "ttft": ttft,
            "tpot": statistics.median(r.tpot for r in ok if r.tpot is not None)
            if any(r.tpot is not None for r in ok) else float("nan"),
            "bytes": delta["bytes"], "wire_s": delta["wire_s"],
            "share": delta["phase_s"] / ttft if ttft else float("nan"),
            "ok": len(ok), "n": n}


def measure_goodput(cfg: DisaggBenchConfig, url: str) -> Summary:
    lengths = LengthRange.parse(cfg.load_input_len, "--load-input-len")
    kind = "fixed" if lengths.low == lengths.high else "uniform"
    workload = Workload(WorkloadConfig(kind, lengths,
                                       LengthRange(cfg.output_len, cfg.output_len)))
    result = run(RunConfig(_endpoint(url), ArrivalConfig("poisson", rate=cfg.rate),
                           num_requests=cfg.load_requests), workload)
    return summarize(result.records, result.duration_s, (cfg.tpot_slo,))


def format_table(cfg: DisaggBenchConfig, layout: KVLayout, raw: dict[int, float],
                 results: dict[str, tuple[dict[int, dict], Summary]]) -> str:
    device = torch.cuda.get_device_name(0) if cfg.device == "cuda" else "CPU"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    lines = [f"kvrelay bench_disagg  {now} UTC  device: {device}  model: {cfg.model_path} "
             f"({layout.num_layers} "
             f"layers, {layout.num_kv_heads} kv heads, d={layout.head_dim}, {layout.dtype})",
             f"output {cfg.output_len} tokens (ignore_eos); {cfg.requests} sequential requests "
             f"per length; medians. raw = {'NCCL' if cfg.device == 'cuda' else 'gloo'} "
             f"send/recv of the same bytes between two processes"]
    header = (f"{'mode':<13} {'prompt':>7} {'TTFT ms':>9} {'TPOT ms':>8} {'KV MiB':>8} "
              f"{'xfer ms':>8} {'GB/s':>7} {'raw GB/s':>9} {'ratio':>6} {'xfer/TTFT':>9}")
    lines += [header, "-" * len(header)]
    for mode, (rows, _) in results.items():
        for tokens, row in rows.items():
            gbps = row["bytes"] / row["wire_s"] / 1e9 if row["wire_s"] > 0 else float("nan")
            base = raw.get(tokens, float("nan"))
            lines.append(
                f"{mode:<13} {row['prompt_tokens']:>7.0f} {row['ttft'] * 1e3:>9.1f} "
                f"{row['tpot'] * 1e3:>8.2f} {row['bytes'] / 2**20:>8.1f} "
                f"{row['wire_s'] * 1e3:>8.2f} {gbps:>7.2f} {base:>9.2f} {gbps / base:>6.2f} "
                f"{row['share'] * 100:>8.1f}%")
    lines.append(f"load: {cfg.load_requests} requests, Poisson {cfg.rate:g} req/s, prompts "
                 f"{cfg.load_input_len} tokens; SLO {cfg.tpot_slo}")
    for mode, (_, summary) in results.items():
        lines.append(f"{mode:<13} goodput {summary.goodput:.2f} req/s  attainment "
                     f"{summary.attainment * 100:.0f}%  ok {summary.num_ok}/"
                     f"{summary.num_requests}  TPOT p50 {summary.tpot.p50 * 1e3:.2f} ms  "
                     f"p99 {summary.tpot.p99 * 1e3:.2f} ms  TTFT p50 "
                     f"{summary.ttft.p50 * 1e3:.1f} ms")
    return "\n".join(lines)


def collect(cfg: DisaggBenchConfig) -> tuple[KVLayout, dict, dict]:
    layout = model_layout(cfg)
    results = {}
    for mode, mode_args in MODES.items():
        with Server(cfg, mode_args) as server:
            rows = {t: measure_length(cfg, server.url, t) for t in cfg.tokens}
            results[mode] = (rows, measure_goodput(cfg, server.url))
    # After the servers let go of the GPUs; the disaggregated run's bytes per request.
    moved = {t: row["bytes"] for t, row in results[next(iter(MODES))][0].items()}
    return layout, raw_baseline(cfg, layout, moved), results


def main(argv: list[str] | None = None) -> int:
    cfg = _parse(argv)
    if cfg.device == "cuda" and torch.cuda.device_count() < 2:
        print("bench_disagg needs two GPUs (or --device cpu)")
        return 2
    print(format_table(cfg, *collect(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
