"""python -m cluster.bench.bench_disagg: disaggregated (1 prefill + 1 decode) against colocated (2).

For each mode it starts `kvrelay serve` (Ray, two GPUs), sends one warm-up request, then
- per prompt length (`--tokens`): `--requests` sequential requests; medians of TTFT and TPOT
  (client side, loadtest's definitions); the KV bytes and wire seconds of their transfers and
  the mean KV ready delay (end of prefill, token 1 sampled, to the KV landed on the decode
  worker), from the gateway's counters; wire GB/s beside raw send/recv of the same bytes
  between two processes (measured last, once the servers let go of the GPUs). The KV ready
  delay comes after token 1, so "ready/TTFT" is a ratio, not a share of TTFT: it can pass 1.
- goodput sweep: open-loop Poisson load at each of `--rates` (`--load-requests` each, prompts
  drawn from `--load-input-len`, the same requests and send times in both modes): throughput,
  goodput (requests/s meeting `--tpot-slo`, default tpot_p90=20ms), whether the run holds the
  SLO's percentile, TTFT and TPOT p50/p90, and goodput disaggregated / colocated.
Prompts are token ids below the model's vocabulary size: exact lengths, and the only prompts a
`--dummy-config` model (random weights, no tokenizer) can serve. Each point's run.json and
plots go to `--output-dir`. Runs on CPU too (`--device cpu`, a tiny model): how it is tested.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from cluster.bench import bench_kv
from loadtest.arrival import ArrivalConfig
from loadtest.client import EndpointConfig
from loadtest.report import fmt, load_run
from loadtest.runner import RunConfig, run
from loadtest.slo import SLO, parse_slo
from loadtest.sweep import SweepResult, parse_loads, run_sweep
from loadtest.workload import LengthRange, Workload, WorkloadConfig
from workers.kv_transfer import KVLayout, plan_transfer
from workers.model.config import ModelConfig
from workers.model.presets import resolve_config_path

MODEL_NAME = "bench"
DISAGG, COLOCATED = "disagg 1P+1D", "colocated x2"
MODES = {DISAGG: ["--prefill", "1", "--decode", "1"], COLOCATED: ["--colocated", "2"]}


@dataclass(frozen=True)
class DisaggBenchConfig:
    model_args: tuple[str, ...]
    """--model DIR or --dummy-config FILE, as `kvrelay serve` takes them."""
    model_path: str
    device: str
    dtype: str
    attention_backend: str
    tokens: tuple[int, ...]
    output_len: int
    requests: int
    rates: tuple[float, ...]
    load_requests: int
    load_input_len: LengthRange
    tpot_slo: SLO
    tpot_limits_ms: tuple[float, ...]
    output_dir: Path
    port: int
    startup_timeout_s: float
    extra_serve_args: tuple[str, ...]

    @property
    def max_model_len(self) -> int:
        """Room for the longest prompt and its output (a short context keeps CUDA graphs'
        block tables small)."""
        longest = max((*self.tokens, self.load_input_len.high if self.rates else 1))
        return longest + self.output_len + 16


def _list(text: str, cast, flag: str) -> tuple:
    if not text.strip():
        return ()
    return tuple(cast(x) for x in parse_loads(text, flag))


def _parse(argv: list[str] | None) -> DisaggBenchConfig:
    p = argparse.ArgumentParser(prog="python -m cluster.bench.bench_disagg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder")
    src.add_argument("--dummy-config", type=resolve_config_path,
                     help="config.json or a preset name (llama3-8b): random weights")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--attention-backend", choices=["triton", "torch"], default=None,
                   help="default: triton on cuda, torch on cpu")
    p.add_argument("--tokens", default="1024,4096,16384",
                   help="prompt lengths of the latency table ('' skips it)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens (ignore_eos)")
    p.add_argument("--requests", type=int, default=4, help="sequential requests per length")
    p.add_argument("--rates", default="1,2,4,8",
                   help="goodput sweep: request rates, req/s ('' skips it)")
    p.add_argument("--load-requests", type=int, default=32, help="requests per rate")
    p.add_argument("--load-input-len", default="1024:8192", help="N or LO:HI prompt tokens")
    p.add_argument("--tpot-slo", default="tpot_p90=20ms",
                   help="the SLO of goodput (loadtest --slo syntax)")
    p.add_argument("--tpot-limits", default="10,20",
                   help="also tabulate goodput with each request's TPOT <= each limit (ms)")
    p.add_argument("--output-dir", default=None,
                   help="sweep runs (default bench-disagg-out/<UTC time>)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("serve_args", nargs="*", help="more `kvrelay serve` flags (after --)")
    a = p.parse_args(argv)
    model_args = ("--model", a.model) if a.model else ("--dummy-config", a.dummy_config)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return DisaggBenchConfig(
        model_args, a.model or a.dummy_config, a.device, a.dtype,
        a.attention_backend or ("triton" if a.device == "cuda" else "torch"),
        _list(a.tokens, int, "--tokens"), a.output_len, a.requests,
        _list(a.rates, float, "--rates"), a.load_requests,
        LengthRange.parse(a.load_input_len, "--load-input-len"), parse_slo(a.tpot_slo),
        _list(a.tpot_limits, float, "--tpot-limits"),
        Path(a.output_dir or f"bench-disagg-out/{stamp}"), a.port, a.startup_timeout,
        tuple(a.serve_args))


def model_layout(cfg: DisaggBenchConfig, model: ModelConfig) -> KVLayout:
    """The served model's KV shape, for raw send/recv of the same bytes."""
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
                   "--device", cfg.device, "--dtype", cfg.dtype,
                   "--attention-backend", cfg.attention_backend,
                   "--max-model-len", str(cfg.max_model_len),
                   # Whole prompts' KV on the wire: the warm-up's prompt must not be cached.
                   "--no-prefix-caching", *mode_args,
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


@dataclass(frozen=True)
class ModeResult:
    lengths: dict[int, dict[str, float]]
    """Per prompt length: medians of ttft/tpot (s); means of bytes, wire_s, kv_ready (s)."""
    sweep: SweepResult | None


def scrape(url: str) -> dict[str, float]:
    """The gateway's cumulative KV counters (/v1/metrics, cluster/metrics.py)."""
    totals = httpx.get(url + "/v1/metrics", timeout=10.0).json()
    keys = ("kv_transfer_bytes", "kv_transfer_seconds", "kv_ready_delay_seconds",
            "kv_ready_delay_count")
    return {key: float(totals.get(key, 0.0)) for key in keys}


def _endpoint(url: str) -> EndpointConfig:
    return EndpointConfig(url, MODEL_NAME, ignore_eos=True, timeout_s=600.0)


def _workload(cfg: DisaggBenchConfig, vocab_size: int, lengths: LengthRange,
              output_len: int) -> Workload:
    kind = "fixed" if lengths.low == lengths.high else "uniform"
    return Workload(WorkloadConfig(kind, lengths, LengthRange(output_len, output_len),
                                   prompt_format="token_ids", vocab_size=vocab_size))


def _run_sequential(url: str, workload: Workload, n: int) -> list:
    result = run(RunConfig(_endpoint(url), ArrivalConfig("closed", concurrency=1),
                           num_requests=n), workload)
    if not any(r.ok for r in result.records):
        errors = {f"{r.error}: {r.error_detail[:200]}" for r in result.records}
        raise RuntimeError(f"no request succeeded: {errors}")
    return result.records


def measure_length(cfg: DisaggBenchConfig, url: str, vocab_size: int,
                   tokens: int) -> dict[str, float]:
    """Sequential requests of one prompt length: medians of TTFT/TPOT, means of the KV
    counters (bytes and wire seconds per request, KV ready delay per transferred request)."""
    before = scrape(url)
    workload = _workload(cfg, vocab_size, LengthRange(tokens, tokens), cfg.output_len)
    records = _run_sequential(url, workload, cfg.requests)
    delta = {k: v - before[k] for k, v in scrape(url).items()}
    ok = [r for r in records if r.ok]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    ttft = statistics.median(r.ttft for r in ok)
    count = delta["kv_ready_delay_count"]
    kv_ready = delta["kv_ready_delay_seconds"] / count if count else math.nan
    return {"prompt_tokens": statistics.median(r.prompt_tokens for r in ok), "ttft": ttft,
            "tpot": statistics.median(tpots) if tpots else math.nan,
            "bytes": delta["kv_transfer_bytes"] / len(records),
            "wire_s": delta["kv_transfer_seconds"] / len(records),
            "kv_ready": kv_ready, "ok": len(ok), "n": len(records)}


def measure_goodput(cfg: DisaggBenchConfig, url: str, vocab_size: int,
                    mode: str) -> SweepResult:
    """Open-loop Poisson load at each rate; the same seed, so the same requests and send times
    in every mode."""
    workload = _workload(cfg, vocab_size, cfg.load_input_len, cfg.output_len)
    timeout = cfg.load_requests / min(cfg.rates) + 600.0
    base = RunConfig(_endpoint(url), ArrivalConfig("poisson", rate=cfg.rates[0]),
                     num_requests=cfg.load_requests, global_timeout_s=timeout)
    target = (cfg.tpot_slo.percentile or 90.0) / 100
    out_dir = cfg.output_dir / mode.replace(" ", "_").replace("+", "")
    return run_sweep(base, workload, "rate", list(cfg.rates), (cfg.tpot_slo,), target, out_dir,
                     progress=False, label=mode)


def collect(cfg: DisaggBenchConfig) -> tuple[KVLayout, dict[int, float], dict[str, ModeResult]]:
    model = ModelConfig.from_path(cfg.model_path)
    layout = model_layout(cfg, model)
    results = {}
    for mode, mode_args in MODES.items():
        _note(f"{mode}: starting kvrelay serve {' '.join(mode_args)}")
        with Server(cfg, mode_args) as server:
            warm_up = min((*cfg.tokens, cfg.load_input_len.low))
            _run_sequential(server.url, _workload(cfg, model.vocab_size,
                                                  LengthRange(warm_up, warm_up), 8), 1)
            _note(f"{mode}: {cfg.requests} requests at each of {cfg.tokens} tokens")
            lengths = {t: measure_length(cfg, server.url, model.vocab_size, t)
                       for t in cfg.tokens}
            _note(f"{mode}: goodput at {cfg.rates} req/s" if cfg.rates else "")
            sweep = measure_goodput(cfg, server.url, model.vocab_size, mode) \
                if cfg.rates else None
            results[mode] = ModeResult(lengths, sweep)
    # After the servers let go of the GPUs; the disaggregated run's bytes per request.
    _note("raw send/recv of the same bytes")
    moved = {t: row["bytes"] for t, row in results[DISAGG].lengths.items()}
    return layout, raw_baseline(cfg, layout, moved), results


def _note(text: str) -> None:
    if text:
        print(f"bench_disagg: {text}", file=sys.stderr, flush=True)


def _cell(value: float, width: int, spec: str = ".2f", scale: float = 1.0) -> str:
    text = "-" if value is None or not math.isfinite(value) else f"{value * scale:{spec}}"
    return f"{text:>{width}}"


def format_lengths(raw: dict[int, float], results: dict[str, ModeResult]) -> list[str]:
    header = (f"{'mode':<13} {'prompt':>7} {'TTFT ms':>9} {'TPOT ms':>8} {'KV MiB':>8} "
              f"{'wire GB/s':>9} {'raw GB/s':>9} {'wire/raw':>8} {'KV ready ms':>11} "
              f"{'ready/TTFT':>10}")
    lines = [header, "-" * len(header)]
    for mode, result in results.items():
        for tokens, row in result.lengths.items():
            moved = row["bytes"] > 0
            gbps = row["bytes"] / row["wire_s"] / 1e9 if moved and row["wire_s"] > 0 else math.nan
            base = raw.get(tokens, math.nan) if moved else math.nan
            lines.append(
                f"{mode:<13} {row['prompt_tokens']:>7.0f} {_cell(row['ttft'], 9, '.1f', 1e3)} "
                f"{_cell(row['tpot'], 8, '.2f', 1e3)} "
                f"{_cell(row['bytes'] if moved else math.nan, 8, '.2f', 2**-20)} "
                f"{_cell(gbps, 9)} {_cell(base, 9)} {_cell(gbps / base, 8)} "
                f"{_cell(row['kv_ready'], 11, '.2f', 1e3)} "
                f"{_cell(row['kv_ready'] / row['ttft'], 10, '.3f')}")
    return lines


def format_goodput(cfg: DisaggBenchConfig, results: dict[str, ModeResult]) -> list[str]:
    header = (f"{'rate':>5} {'mode':<13} {'ok/sent':>8} {'req/s':>6} {'goodput':>7} "
              f"{'held':>4} {'TTFT p50':>8} {'TTFT p90':>8} {'TPOT p50':>8} {'TPOT p90':>8} "
              f"{'goodput D/C':>11}")
    lines = [header, "-" * len(header)]
    sweeps = {mode: r.sweep for mode, r in results.items() if r.sweep is not None}
    colocated = sweeps.get(COLOCATED)
    for i, rate in enumerate(cfg.rates):
        for mode, sweep in sweeps.items():
            s = sweep.points[i].summary
            ratio = ""
            if mode == DISAGG and colocated is not None:
                base = colocated.points[i].summary.goodput
                ratio = f"{s.goodput / base:.2f}" if base else ("inf" if s.goodput else "-")
            lines.append(
                f"{rate:>5g} {mode:<13} {f'{s.num_ok}/{s.num_requests}':>8} "
                f"{s.request_throughput:>6.2f} {s.goodput:>7.2f} "
                f"{'yes' if s.slos_held else 'no':>4} {fmt(s.ttft.p50, 1e3, 1):>8} "
                f"{fmt(s.ttft.p90, 1e3, 1):>8} {fmt(s.tpot.p50, 1e3):>8} "
                f"{fmt(s.tpot.p90, 1e3):>8} {ratio:>11}")
    lines += format_limits(cfg, sweeps)
    best = {mode: sweep.best_load for mode, sweep in sweeps.items()}
    lines.append(f"highest rate holding {cfg.tpot_slo} (req/s): " + ", ".join(
        f"{mode} {'none' if load is None else f'{load:g}'}" for mode, load in best.items()))
    return lines


def format_limits(cfg: DisaggBenchConfig, sweeps: dict) -> list[str]:
    """Goodput per request-level TPOT limit (requests/s whose own TPOT met it), from the
    same runs: how the comparison moves as the SLO tightens."""
    if not cfg.tpot_limits_ms or COLOCATED not in sweeps or DISAGG not in sweeps:
        return []
    lines = ["", "goodput (req/s) with the request's own TPOT <= limit, 1P+1D / colocated = ratio"]
    header = f"{'rate':>5} " + " ".join(f"{f'<= {ms:g} ms':>22}" for ms in cfg.tpot_limits_ms)
    lines += [header, "-" * len(header)]
    for i, rate in enumerate(cfg.rates):
        cells = []
        for ms in cfg.tpot_limits_ms:
            d, c = (_goodput_within(sweeps[m].points[i], ms / 1e3) for m in (DISAGG, COLOCATED))
            ratio = f"{d / c:.2f}" if c else ("inf" if d else "-")
            cells.append(f"{f'{d:.2f} / {c:.2f} = {ratio}':>22}")
        lines.append(f"{rate:>5g} " + " ".join(cells))
    return lines


def _goodput_within(point, limit_s: float) -> float:
    run = load_run(point.run_json)
    good = sum(1 for r in run.records if r.tpot is not None and r.tpot <= limit_s)
    return good / run.summary.duration_s if run.summary.duration_s > 0 else 0.0


def format_table(cfg: DisaggBenchConfig, layout: KVLayout, raw: dict[int, float],
                 results: dict[str, ModeResult]) -> str:
    device = f"2x {torch.cuda.get_device_name(0)}" if cfg.device == "cuda" else "CPU"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    link = "NCCL" if cfg.device == "cuda" else "gloo"
    lines = [f"kvrelay bench_disagg  {now} UTC  device: {device}  model: {cfg.model_path} "
             f"({layout.num_layers} layers, {layout.num_kv_heads} kv heads, "
             f"d={layout.head_dim}, {layout.dtype}, {cfg.attention_backend} attention)",
             f"prompts: random token ids (exact lengths); output {cfg.output_len} tokens "
             f"(ignore_eos)"]
    if cfg.tokens:
        lines += ["", f"latency: {cfg.requests} sequential requests per length; medians of "
                      f"TTFT/TPOT, means of the KV counters; raw = {link} send/recv of the same "
                      f"bytes between two processes; KV ready = end of prefill to KV landed "
                      f"(after token 1: ready/TTFT is a ratio, not a share)",
                  *format_lengths(raw, results)]
    if cfg.rates:
        slo = cfg.tpot_slo
        held = f"at least {slo.percentile:g}%" if slo.percentile is not None else "all"
        lines += ["", f"goodput: Poisson, {cfg.load_requests} requests per rate, prompts "
                      f"{cfg.load_input_len.low}:{cfg.load_input_len.high} tokens (uniform), "
                      f"same requests in both modes; goodput = requests/s with {slo.metric} <= "
                      f"{slo.limit_s * 1e3:g} ms; held = {held} of requests sent met it; "
                      f"latencies in ms; runs in {cfg.output_dir}",
                  *format_goodput(cfg, results)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = _parse(argv)
    if cfg.device == "cuda" and torch.cuda.device_count() < 2:
        print("bench_disagg needs two GPUs (or --device cpu)")
        return 2
    print(format_table(cfg, *collect(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
