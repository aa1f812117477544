"""`kvrelay loadtest {run,sweep,compare}` (also `python -m loadtest`): argument parsing and the
one place where flags become frozen configs. Exit codes: 0 ok, 2 bad flags or input files."""

from __future__ import annotations

import argparse
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from loadtest.arrival import ARRIVAL_KINDS, ArrivalConfig
from loadtest.benchmark import benchmark
from loadtest.client import EndpointConfig
from loadtest.compare import markdown_compare
from loadtest.errors import BadFlag, LoadtestError
from loadtest.report import load_run
from loadtest.runner import RunConfig
from loadtest.slo import parse_slo
from loadtest.sweep import markdown_sweep, parse_loads, run_sweep
from loadtest.synthetic_ids import DEFAULT_VOCAB_SIZE
from loadtest.trace import load_trace
from loadtest.workload import (
    PROMPT_FORMATS,
    WORKLOAD_KINDS,
    LengthRange,
    Workload,
    WorkloadConfig,
)


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name sent in each request")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="/v1/completions or /v1/chat/completions")
    p.add_argument("--arrival", choices=ARRIVAL_KINDS, default=None,
                   help="default: trace with --trace-file, poisson with --rate, closed with "
                        "only --concurrency, else poisson at rate inf")
    p.add_argument("--rate", type=float, default=None, help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="closed loop: requests in flight; open loop: cap on in-flight requests")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests to send (default 100 unless --duration)")
    p.add_argument("--duration", type=float, default=None, help="stop sending after N seconds")
    p.add_argument("--workload", choices=WORKLOAD_KINDS, default=None,
                   help="default: trace/file when those files are given, uniform for LO:HI "
                        "lengths, else fixed")
    p.add_argument("--input-len", default="128",
                   help="prompt tokens: N or LO:HI (approximate for text, exact for token_ids)")
    p.add_argument("--output-len", default="64", help="max_tokens: N or LO:HI")
    p.add_argument("--shared-prefix-len", type=int, default=0,
                   help="tokens of one prefix shared by every synthetic prompt")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="text",
                   help="synthetic prompts as English words, or as token ids (completions "
                        "only; exact lengths; for servers without a tokenizer)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="token_ids: ids drawn from [min(100, V/2), V) (default 1000: inside "
                        "any real vocabulary)")
    p.add_argument("--prompts-file", default=None, help='JSONL: {"prompt": ...} or messages')
    p.add_argument("--trace-file", default=None,
                   help="JSONL or CSV rows: timestamp, input_length, output_length")
    p.add_argument("--trace-time-unit", choices=("s", "ms"), default="s")
    p.add_argument("--trace-speedup", type=float, default=1.0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos and min_tokens=max_tokens to fix output lengths")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", action="append", default=[],
                   help="repeatable: ttft=500ms, tpot=50ms, e2e=2s")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request limit, seconds")
    p.add_argument("--global-timeout", type=float, default=None,
                   help="whole-run limit, seconds (default: duration+timeout+30, or 3600)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--output-dir", default=None, help="default loadtest-out/<UTC time>")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("--label", default=None,
                   help="what was measured (hardware, topology), e.g. 'H100 1P1D'; shown in "
                        "tables and used by compare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvrelay loadtest",
                                     description="Load-test any OpenAI-compatible endpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_load_flags(sub.add_parser("run", help="one run at one load"))
    sweep = sub.add_parser("sweep", help="runs at rising load; highest load meeting the SLOs")
    _add_load_flags(sweep)
    axis = sweep.add_mutually_exclusive_group(required=True)
    axis.add_argument("--rates", help="comma-separated request rates, e.g. 1,2,4,8")
    axis.add_argument("--concurrencies", help="comma-separated closed-loop concurrencies")
    sweep.add_argument("--target-attainment", type=float, default=0.9,
                       help="fraction of requests that must meet every SLO")
    compare = sub.add_parser("compare", help="two run.json files side by side, with ratios")
    compare.add_argument("a", help="run.json of run A (e.g. colocated)")
    compare.add_argument("b", help="run.json of run B (e.g. disaggregated)")
    compare.add_argument("--labels", default=None, help="A,B labels (default: file paths)")
    compare.add_argument("--output", default=None, help="also write the markdown here")
    return parser


def _arrival_kind(args: argparse.Namespace) -> str:
    if args.arrival:
        return args.arrival
    if args.trace_file:
        return "trace"
    if args.rate is None and args.concurrency is not None:
        return "closed"
    return "poisson"


def _workload(args: argparse.Namespace) -> tuple[Workload, list[float]]:
    trace = load_trace(args.trace_file, args.trace_time_unit) if args.trace_file else None
    input_len = LengthRange.parse(args.input_len, "--input-len")
    output_len = LengthRange.parse(args.output_len, "--output-len")
    ranged = input_len.low != input_len.high or output_len.low != output_len.high
    kind = args.workload or ("trace" if trace else "file" if args.prompts_file
                             else "uniform" if ranged else "fixed")
    config = WorkloadConfig(kind, input_len, output_len, args.shared_prefix_len,
                            args.prompts_file, args.seed, args.prompt_format, args.vocab_size)
    return Workload(config, trace), [e.timestamp for e in trace or []]


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """Flags -> RunConfig (raises BadFlag with the flag's name on nonsense)."""
    arrival = ArrivalConfig(_arrival_kind(args), math.inf if args.rate is None else args.rate,
                            args.burstiness, args.concurrency, args.trace_speedup)
    if args.trace_file and arrival.kind != "trace":
        raise BadFlag("--arrival", arrival.kind, "--trace-file replays with --arrival trace")
    endpoint = EndpointConfig(args.url, args.model, args.endpoint, args.timeout,
                              args.ignore_eos, args.temperature, args.api_key)
    num_requests = args.num_requests if args.num_requests or args.duration else 100
    global_timeout = args.global_timeout or (
        args.duration + args.timeout + 30 if args.duration else 3600.0)
    return RunConfig(endpoint, arrival, num_requests, args.duration, global_timeout, args.seed)


def _out_dir(args: argparse.Namespace) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(args.output_dir or f"loadtest-out/{stamp}")


def _cmd_run(args: argparse.Namespace) -> int:
    config, slos = build_run_config(args), tuple(parse_slo(s) for s in args.slo)
    workload, trace_times = _workload(args)
    doc, outputs = benchmark(config, workload, slos, _out_dir(args), trace_times,
                             progress=not args.no_progress,
                             source=args.trace_file or args.prompts_file, label=args.label)
    print(outputs.markdown.read_text())
    print(f"wrote {outputs.json}, {outputs.markdown}, " + ", ".join(map(str, outputs.plots)))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    if args.trace_file:
        raise BadFlag("--trace-file", args.trace_file, "a trace fixes its own load; use run")
    if not 0 < args.target_attainment <= 1:
        raise BadFlag("--target-attainment", args.target_attainment, "must be in (0, 1]")
    axis = "rate" if args.rates else "concurrency"
    flag = "--rates" if axis == "rate" else "--concurrencies"
    loads = parse_loads(args.rates or args.concurrencies, flag)
    if axis == "rate" and args.rate is None:
        args.rate = loads[0]  # the base config must be valid; each point sets its own rate
    if axis == "rate" and _arrival_kind(args) == "closed":
        raise BadFlag("--arrival", "closed", "--rates sweeps need an open-loop arrival")
    if axis == "concurrency":
        args.concurrency = int(loads[0])
    config, slos = build_run_config(args), tuple(parse_slo(s) for s in args.slo)
    workload, _ = _workload(args)
    result = run_sweep(config, workload, axis, loads, slos, args.target_attainment,
                       _out_dir(args), progress=not args.no_progress, source=args.prompts_file,
                       label=args.label)
    print(markdown_sweep(result))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    a, b = load_run(args.a), load_run(args.b)
    labels = args.labels.split(",", 1) if args.labels else [
        doc.meta.get("label") or path for doc, path in ((a, args.a), (b, args.b))]
    if len(labels) != 2:
        raise BadFlag("--labels", args.labels, "expected two labels, A,B")
    table = markdown_compare(a, b, labels[0], labels[1])
    print(table)
    if args.output:
        Path(args.output).write_text(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    command = {"run": _cmd_run, "sweep": _cmd_sweep, "compare": _cmd_compare}[args.command]
    try:
        return command(args)
    except LoadtestError as exc:
        print(f"kvrelay loadtest: error: {exc}", file=sys.stderr)
        return 2
