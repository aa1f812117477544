"""python -m cluster.bench.bench_kv: KV-transfer bandwidth against raw send/recv, for one request.

(a) Two processes on two GPUs (or two CPU processes with `--device cpu`, gloo): raw
    torch.distributed send/recv of one request's KV bytes beside our transfer of the same
    request (pack + header + send + recv + unpack + ack), GB/s and the ratio.
(b) One device: pack and unpack throughput against a plain copy of the same bytes, and the
    ZMQ path between two processes on that one device.
(c) With `--kv-cache-dtype fp8`: (a) and (b) move an e4m3 cache, and the same request is
    also sent with the `--dtype` cache (bf16) over the same path in the same run: the time per
    request of each and their ratio (fp8 moves half the bytes: the target is ~0.5x).
(a) and (c) also print the messages one transfer put on the wire and MiB per message, as the
    pair counted them (torch transport; small messages are latency-bound, and
    `--coalesce-below-mib N` stages them into larger ones: TransferConfig.coalesce_below_bytes /
    message_bytes; off by default, it measured slower on 2x H200 at 4k and 16k tokens; a
    request sent whole, as here, stages messages under `--coalesce-whole-below-mib`: by
    default 1 MiB on CUDA, where one launch packs every layer, and 0 on CPU).
`--timeline`: both ends record their transfer events (workers/kv_transfer/timeline.py) and
    a table gives the median ms from send() to each: where the fixed part of a transfer goes.
Sizes: one request's KV at each `--tokens` prompt length with Llama-3-8B's KV shape (32
layers, 8 kv heads, head_dim 128, bf16, block 16) unless overridden. GB/s = payload bytes / s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import queue
import random
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.multiprocessing as mp

from workers.kv_transfer import (
    KVLayout,
    Receiver,
    TransferConfig,
    TransferState,
    make_sender,
    timeline,
)
from workers.kv_transfer.layout import plan_transfer
from workers.kv_transfer.packing import copy_path, pack, unpack
from workers.kv_transfer.pair_group import RECEIVER_RANK, SENDER_RANK, PairGroup, host_store
from workers.kv_transfer.stream_plan import coalesce_below

FP8 = "float8_e4m3fn"


@dataclass(frozen=True)
class BenchConfig:
    device: str
    tokens: tuple[int, ...]
    iters: int
    warmup: int
    layout: KVLayout
    host: str = "127.0.0.1"
    probe_bytes: int = 4 << 20
    scattered: bool = False
    baseline_dtype: str | None = None
    """With an fp8 cache: the cache dtype (c) compares against, in the same run."""
    coalesce_below_bytes: int = TransferConfig.coalesce_below_bytes
    message_bytes: int = TransferConfig.message_bytes
    coalesce_whole_below_bytes: int | None = TransferConfig.coalesce_whole_below_bytes
    timeline: bool = False
    """Record both ends' transfer events (workers/kv_transfer/timeline.py) and print where
    each transfer's time goes."""

    def transfer_config(self, transport: str) -> TransferConfig:
        return TransferConfig(transport, self.host, timeout_s=600, probe_bytes=self.probe_bytes,
                              coalesce_below_bytes=self.coalesce_below_bytes,
                              coalesce_whole_below_bytes=self.coalesce_whole_below_bytes,
                              message_bytes=self.message_bytes)

    def num_bytes(self, tokens: int) -> int:
        plan = plan_transfer(self.layout, self.layout)
        return plan.num_bytes(self.layout, self.num_blocks(tokens))

    def num_blocks(self, tokens: int) -> int:
        return -(-tokens // self.layout.block_size)


def _parse(argv: list[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(prog="python -m cluster.bench.bench_kv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tokens", default=None, help="prompt lengths, comma-separated "
                        "(default 1024,4096,16384 on cuda; 64,256,1024 on cpu)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                        help="fp8: move an e4m3 cache, and compare with --dtype's (c)")
    parser.add_argument("--coalesce-below-mib", type=float,
                        default=TransferConfig.coalesce_below_bytes / 2**20,
                        help="torch transport: block-run messages below this go staged, "
                        "several layers per message (0: never for size; the old path)")
    parser.add_argument("--coalesce-whole-below-mib", type=float, default=None,
                        help="torch transport, a request sent whole (this bench's case): "
                        "block-run messages below this go staged (default: 1 MiB where one "
                        "launch packs every layer, i.e. CUDA; 0 elsewhere; "
                        "TransferConfig.coalesce_whole_below_bytes)")
    parser.add_argument("--message-mib", type=float,
                        default=TransferConfig.message_bytes / 2**20,
                        help="torch transport: what a staged message fills up to")
    parser.add_argument("--scattered", action="store_true",
                        help="random block ids (every block its own run: the packed path)")
    parser.add_argument("--timeline", action="store_true",
                        help="torch transport: print the median time of each event of a "
                        "transfer on both ends, from send() (KVRELAY_KV_TIMELINE=1)")
    args = parser.parse_args(argv)
    tokens = args.tokens or ("1024,4096,16384" if args.device == "cuda" else "64,256,1024")
    fp8 = args.kv_cache_dtype == "fp8"
    layout = KVLayout("llama-3-8b-kv-shape", FP8 if fp8 else args.dtype, args.block_size,
                      args.layers, args.kv_heads, args.head_dim)
    return BenchConfig(args.device, tuple(int(t) for t in tokens.split(",")), args.iters,
                       args.warmup, layout, probe_bytes=(64 << 20) if args.device == "cuda"
                       else (4 << 20), scattered=args.scattered,
                       baseline_dtype=args.dtype if fp8 else None,
                       coalesce_below_bytes=int(args.coalesce_below_mib * 2**20),
                       message_bytes=int(args.message_mib * 2**20), timeline=args.timeline,
                       coalesce_whole_below_bytes=None if args.coalesce_whole_below_mib is None
                       else int(args.coalesce_whole_below_mib * 2**20))


def _caches(cfg: BenchConfig, device: torch.device, seed: int):
    num_blocks = cfg.num_blocks(max(cfg.tokens)) + 1
    shape = (num_blocks, cfg.layout.block_size, cfg.layout.num_kv_heads, cfg.layout.head_dim)
    torch.manual_seed(seed)
    dtype = getattr(torch, cfg.layout.dtype)
    return [tuple(torch.randn(shape, device=device).to(dtype) for _ in range(2))
            for _ in range(cfg.layout.num_layers)]


def _block_ids(cfg: BenchConfig, tokens: int, seed: int) -> list[int]:
    """A request's blocks: one contiguous range at a random offset (what a pool hands out
    when it is not fragmented), or random scattered ids with `--scattered` (worst case)."""
    rng, total, count = random.Random(seed), cfg.num_blocks(max(cfg.tokens)) + 1, \
        cfg.num_blocks(tokens)
    if cfg.scattered:
        return rng.sample(range(total), count)
    first = rng.randrange(total - count + 1)
    return list(range(first, first + count))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _receiver_main(cfg: BenchConfig, transport: str, device: str, raw: bool, conn,
                   out) -> None:
    """Rank 0: raw recvs (timed here), then a Receiver with reservations for every transfer."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results = {}
    if raw:
        store = host_store(cfg.host, 60)
        conn.send(store.port)
        group = PairGroup(store, cfg.host, store.port, RECEIVER_RANK, 0, device, 120)
        for tokens in cfg.tokens:
            buf = torch.empty(cfg.num_bytes(tokens), dtype=torch.uint8, device=device)
            for _ in range(cfg.warmup):
                group.wait(group.post_recv(buf), 120)
            start = time.perf_counter()
            for _ in range(cfg.iters):
                group.wait(group.post_recv(buf), 120)
            results[tokens] = buf.numel() * cfg.iters / (time.perf_counter() - start) / 1e9
        group.close()
    config = cfg.transfer_config(transport)
    landed = {}  # request id -> perf_counter() when its KV landed here (a decode step could run)
    receiver = Receiver(cfg.layout, _caches(cfg, device, seed=1), config,
                        on_done=lambda rid, extra: landed.setdefault(rid, time.perf_counter()))
    conn.send(receiver.address)
    for tokens in cfg.tokens:
        for i in range(cfg.warmup + cfg.iters):
            receiver.expect(f"{tokens}-{i}", _block_ids(cfg, tokens, seed=2), 600)
        conn.send("expected")
        conn.recv()
    out.put(("receiver", {"raw": results, "landed": landed, "r_marks": timeline.take()}))
    conn.recv()  # the sender's report is out: nothing is in flight any more
    receiver.close()


def _sender_main(cfg: BenchConfig, transport: str, device: str, raw: bool, conn,
                 out) -> None:
    """Rank 1: raw sends, then our transfers, each timed from send() to the sender's ack (and
    its start time kept, for the time to the KV having landed on the receiver)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if raw:
        group = PairGroup(None, cfg.host, conn.recv(), SENDER_RANK, 0, device, 120)
        for tokens in cfg.tokens:
            buf = torch.randint(0, 255, (cfg.num_bytes(tokens),), dtype=torch.uint8,
                                device=device)
            for _ in range(cfg.warmup + cfg.iters):
                group.send(buf, 120)
        group.close()
    config = cfg.transfer_config(transport)
    sender = make_sender(cfg.layout, _caches(cfg, device, seed=3), config)
    address = conn.recv()
    acked, starts, messages = {}, {}, {}
    for tokens in cfg.tokens:
        conn.recv()
        src, dst = _block_ids(cfg, tokens, seed=4), _block_ids(cfg, tokens, seed=2)
        seconds = []
        for i in range(cfg.warmup + cfg.iters):
            sent = _sends(sender, address)
            start = starts[f"{tokens}-{i}"] = time.perf_counter()
            sender.send(f"{tokens}-{i}", address, src, dst, num_tokens=tokens)
            state = sender.wait(f"{tokens}-{i}", 600)
            if state is not TransferState.DONE:
                raise RuntimeError(f"transfer {tokens}-{i}: {sender.table.get(f'{tokens}-{i}')}")
            seconds.append(time.perf_counter() - start)
            messages[tokens] = [b - a for a, b in zip(sent, _sends(sender, address),
                                                      strict=True)]
        acked[tokens] = cfg.num_bytes(tokens) / statistics.median(seconds[cfg.warmup:]) / 1e9
        conn.send("done")
    out.put(("sender", {"acked": acked, "starts": starts, "path": sender.path(address),
                        "probe_gbps": sender.bandwidth(address), "messages": messages,
                        "s_marks": timeline.take()}))
    sender.close()
    conn.send("closed")


def _sends(sender, address: str) -> tuple[int, int]:
    """(messages, bytes) the sender has put on the wire to `address` (torch transport;
    (0, 0) for others, which do not count)."""
    return sender.sends(address) if hasattr(sender, "sends") else (0, 0)


def _per_message(report: dict, tokens: int) -> tuple[int, float]:
    """(messages of one transfer, MiB per message) as counted on the wire."""
    count, num_bytes = report.get("messages", {}).get(tokens, (0, 0))
    return count, num_bytes / max(1, count) / 2**20


def run_pair(cfg: BenchConfig, transport: str, devices: tuple[str, str], raw: bool) -> dict:
    """Runs receiver and sender in two spawned processes (talking over a pipe); returns
    {'raw': {tokens: GB/s}, 'ours': {tokens: GB/s}, 'acked': {tokens: GB/s}, 'path': ...,
    'probe_gbps': ..., 'messages': {tokens: [messages, bytes] of one transfer}}.
    'ours' times send() on the sender to the KV having landed on the
    receiver (its transfer DONE: what a decode worker waits for; both processes read one
    host's monotonic clock); 'acked' times send() to the sender holding the receiver's ack."""
    ctx = mp.get_context("spawn")
    recv_end, send_end = ctx.Pipe()
    out = ctx.Queue()
    procs = [ctx.Process(target=_receiver_main,
                         args=(cfg, transport, devices[0], raw, recv_end, out)),
             ctx.Process(target=_sender_main,
                         args=(cfg, transport, devices[1], raw, send_end, out))]
    before = os.environ.get(timeline.ENV)
    if cfg.timeline:  # read by workers/kv_transfer/timeline.py when the children import it
        os.environ[timeline.ENV] = "1"
    try:
        for proc in procs:
            proc.start()
    finally:  # only these children record
        if before is None:
            os.environ.pop(timeline.ENV, None)
        else:
            os.environ[timeline.ENV] = before
    try:
        report = _reports(procs, out)
    finally:
        for proc in procs:  # one end failed: the other must not outlive the bench
            if proc.is_alive():
                proc.kill()
    report["ours"] = {tokens: cfg.num_bytes(tokens) / statistics.median(
        report["landed"][f"{tokens}-{i}"] - report["starts"][f"{tokens}-{i}"]
        for i in range(cfg.warmup, cfg.warmup + cfg.iters)) / 1e9 for tokens in cfg.tokens}
    return report


def _reports(procs: list, out) -> dict:
    report = {}
    kinds = set()
    while len(kinds) < 2:  # one report from each end, in either order
        try:
            kind, value = out.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"bench process exited with {dead[0].exitcode}") from None
            continue
        kinds.add(kind)
        report.update(value)
    for proc in procs:
        proc.join(120)
        if proc.exitcode != 0:
            raise RuntimeError(f"bench process {proc.name} exited with {proc.exitcode}")
    return report


def _timed(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds of fn() over iters runs after warmup, synchronized on CUDA."""
    seconds = []
    for i in range(warmup + iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def bench_local(cfg: BenchConfig, device: torch.device) -> dict[int, dict[str, float]]:
    """pack / unpack / plain-copy GB/s of each request size on one device; prints the path
    pack and unpack take there."""
    caches = _caches(cfg, device, seed=5)
    print(f"pack/unpack path on {device}: {copy_path(caches)}")
    return {tokens: _bench_size(cfg, caches, tokens, device) for tokens in cfg.tokens}


def _bench_size(cfg: BenchConfig, caches, tokens: int, device: torch.device) -> dict:
    plan = plan_transfer(cfg.layout, cfg.layout)
    src, dst = _block_ids(cfg, tokens, seed=4), _block_ids(cfg, tokens, seed=2)
    buf = pack(caches, cfg.layout, plan, src)
    copy = torch.empty_like(buf)
    size = buf.numel() * buf.element_size()
    times = {
        "pack": _timed(lambda: pack(caches, cfg.layout, plan, src, out=buf), device,
                       cfg.iters, cfg.warmup),
        "unpack": _timed(lambda: unpack(buf, caches, cfg.layout, plan, dst), device,
                         cfg.iters, cfg.warmup),
        "copy": _timed(lambda: copy.copy_(buf), device, cfg.iters, cfg.warmup),
    }
    return {name: size / t / 1e9 for name, t in times.items()}


def _whole_below(cfg: BenchConfig) -> str:
    """The staging threshold of a request sent whole, in words."""
    config = cfg.transfer_config("torch")
    on = {"one-launch pack (CUDA)": True, "per-layer pack (CPU)": False}
    sizes = {name: coalesce_below(config, True, launch) / 2**20 for name, launch in on.items()}
    if len(set(sizes.values())) == 1:
        return f"{next(iter(sizes.values())):g} MiB"
    return " / ".join(f"{mib:g} MiB with {name}" for name, mib in sizes.items())


def _device_name(cfg: BenchConfig) -> str:
    if cfg.device == "cuda":
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU {platform.processor() or platform.machine()}"


def format_table(cfg: BenchConfig, pair: dict | None, zmq: dict, local: dict) -> str:
    lay = cfg.layout
    lines = [
        f"kvrelay bench_kv  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        f"  device: {_device_name(cfg)}  torch {torch.__version__}",
        f"model KV: {lay.num_layers} layers x {lay.num_kv_heads} kv heads x d={lay.head_dim}, "
        f"{lay.dtype}, block {lay.block_size}; one request per size; median of {cfg.iters} "
        f"after {cfg.warmup} warm-up; GB/s = payload bytes / s; ours: send() to the KV "
        f"landed on the receiver (DONE there), acked: send() to the receiver's ack back",
        f"torch transport, a request sent whole: block-run messages under "
        f"{_whole_below(cfg)} go staged, up to {cfg.message_bytes / 2**20:g} MiB a message "
        "(else direct: each block run's K, V of each layer) (msgs, MiB/msg: as counted on "
        "the wire, one transfer)",
    ]
    if pair:
        lines.append(f"(a) two processes, two devices, path {pair['path']} (start-up probe "
                     f"{pair['probe_gbps'] or 0:.2f} GB/s)")
    lines.append(f"(b) one device: pack/unpack vs copy; ZMQ path between two processes "
                 f"(probe {zmq['probe_gbps'] or 0:.2f} GB/s)")
    header = (f"{'tokens':>7} {'MiB':>8} | {'raw p2p':>8} {'ours':>8} {'ratio':>6} "
              f"{'acked':>8} {'msgs':>5} {'MiB/msg':>7} | "
              f"{'pack':>8} {'unpack':>8} {'copy':>8} {'pk/cp':>6} | {'zmq':>8}")
    lines += [header, "-" * len(header)]
    for tokens in cfg.tokens:
        raw = pair["raw"][tokens] if pair else float("nan")
        ours = pair["ours"][tokens] if pair else float("nan")
        acked = pair["acked"][tokens] if pair else float("nan")
        row = local[tokens]
        count, mib = _per_message(pair, tokens) if pair else (0, float("nan"))
        lines.append(
            f"{tokens:>7} {cfg.num_bytes(tokens) / 2**20:>8.1f} | {raw:>8.2f} {ours:>8.2f} "
            f"{ours / raw:>6.2f} {acked:>8.2f} {count:>5} {mib:>7.1f} | "
            f"{row['pack']:>8.2f} {row['unpack']:>8.2f} "
            f"{row['copy']:>8.2f} {row['pack'] / row['copy']:>6.2f} | {zmq['ours'][tokens]:>8.2f}")
    return "\n".join(lines)


def event_offsets(report: dict, tokens: int, warmup: int, iters: int) -> dict[str, float]:
    """Median ms from send() to each timeline event of the measured transfers of `tokens`
    (both ends' marks; the k-th mark of one name within a transfer is `name#k`, k > 1),
    plus 'landed' (the bench's DONE on the receiver; the ack back is the sender's s.ack)."""
    starts = sorted(report["starts"].values())
    marks = sorted(report.get("s_marks", []) + report.get("r_marks", []), key=lambda m: m[1])
    per_event: dict[str, list[float]] = {}
    for i in range(warmup, warmup + iters):
        rid = f"{tokens}-{i}"
        start = report["starts"][rid]
        later = [s for s in starts if s > start]
        stop = later[0] if later else float("inf")
        seen: dict[str, int] = {}
        for name, at in marks:
            if start <= at < stop:  # send() marks s.send after its start is taken
                seen[name] = seen.get(name, 0) + 1
                key = name if seen[name] == 1 else f"{name}#{seen[name]}"
                per_event.setdefault(key, []).append((at - start) * 1e3)
        per_event.setdefault("landed", []).append((report["landed"][rid] - start) * 1e3)
    return {name: statistics.median(ms) for name, ms in per_event.items()}


def format_timeline(cfg: BenchConfig, report: dict, label: str) -> str:
    """Where a transfer's time goes: median ms from send() to each event, per size (events
    ordered by their time at the first size; a blank: no such event at that size)."""
    offsets = {t: event_offsets(report, t, cfg.warmup, cfg.iters) for t in cfg.tokens}
    first = offsets[cfg.tokens[0]]
    names = sorted({n for o in offsets.values() for n in o},
                   key=lambda n: (first.get(n, float("inf")), n))
    lines = [f"timeline {label}: median ms from send() (s.* sender, r.* receiver; "
             "workers/kv_transfer/timeline.py)",
             f"{'event':>14} | " + " ".join(f"{t:>9}" for t in cfg.tokens)]
    for name in names:
        cells = [f"{offsets[t][name]:>9.3f}" if name in offsets[t] else f"{'':>9}"
                 for t in cfg.tokens]
        lines.append(f"{name:>14} | " + " ".join(cells))
    return "\n".join(lines)


def _devices(cfg: BenchConfig) -> tuple[str, str | None]:
    """(first device, second device or None with one GPU)."""
    if cfg.device == "cpu":
        return "cpu", "cpu"
    return "cuda:0", "cuda:1" if torch.cuda.device_count() >= 2 else None


def collect(cfg: BenchConfig) -> tuple[dict | None, dict, dict]:
    """(two-device raw vs ours, or None with one GPU; ZMQ on one device; pack/unpack/copy)."""
    first, second = _devices(cfg)
    pair = run_pair(cfg, "torch", (first, second), raw=True) if second else None
    if pair is None:
        print("only one GPU: skipping (a), the two-device NCCL comparison")
    zmq = run_pair(cfg, "zmq", (first, first), raw=False)
    return pair, zmq, bench_local(cfg, torch.device(first))


def compare_baseline(cfg: BenchConfig, pair: dict | None, zmq: dict) -> tuple[dict, dict, str]:
    """(c): the same requests with the baseline cache dtype over the two-device path (ZMQ on
    one GPU); returns (fp8 report, baseline report, path) for `format_dtype_table`."""
    first, second = _devices(cfg)
    base_cfg = replace(cfg, layout=replace(cfg.layout, dtype=cfg.baseline_dtype),
                       baseline_dtype=None)
    if pair is not None:
        return pair, run_pair(base_cfg, "torch", (first, second), raw=False), pair["path"]
    return zmq, run_pair(base_cfg, "zmq", (first, first), raw=False), zmq["path"]


def format_dtype_table(cfg: BenchConfig, fp8: dict, base: dict, path: str) -> str:
    """ms per request (send() to the KV landed on the receiver) of each cache dtype."""
    lines = [f"(c) {cfg.layout.dtype} vs {cfg.baseline_dtype} KV, path {path}, same run: "
             f"ms per request, ratio = {cfg.layout.dtype} / {cfg.baseline_dtype} (target ~0.5)"]
    header = (f"{'tokens':>7} {'MiB fp8':>8} {'MiB base':>8} | {'ms fp8':>8} {'ms base':>8} "
              f"{'ratio':>6} | {'msgs fp8':>8} {'MiB/msg':>7} {'msgs base':>9} {'MiB/msg':>7}")
    lines += [header, "-" * len(header)]
    base_cfg = replace(cfg, layout=replace(cfg.layout, dtype=cfg.baseline_dtype))
    for tokens in cfg.tokens:
        sizes = [c.num_bytes(tokens) for c in (cfg, base_cfg)]
        ms = [size / (report["ours"][tokens] * 1e9) * 1e3
              for size, report in zip(sizes, (fp8, base), strict=True)]
        (fp8_count, fp8_mib), (base_count, base_mib) = (_per_message(fp8, tokens),
                                                        _per_message(base, tokens))
        lines.append(f"{tokens:>7} {sizes[0] / 2**20:>8.1f} {sizes[1] / 2**20:>8.1f} | "
                     f"{ms[0]:>8.3f} {ms[1]:>8.3f} {ms[0] / ms[1]:>6.2f} | "
                     f"{fp8_count:>8} {fp8_mib:>7.1f} {base_count:>9} {base_mib:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = _parse(argv)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; run with --device cpu")
        return 2
    pair, zmq, local = collect(cfg)
    print(format_table(cfg, pair, zmq, local))
    base = None
    if cfg.baseline_dtype is not None:
        fp8, base, path = compare_baseline(cfg, pair, zmq)
        print(format_dtype_table(cfg, fp8, base, path))
    if cfg.timeline and pair is not None:
        print(format_timeline(cfg, pair, cfg.layout.dtype))
        if base is not None:
            print(format_timeline(cfg, base, cfg.baseline_dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
