"""Configuration of one worker's KV-transfer end (frozen; built once, passed down)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TransferConfig:
    transport: Literal["torch", "zmq", "cuda_ipc"] = "torch"
    """torch: NCCL between GPUs (gloo on CPU), one communicator per pair. zmq: raw frames over
    TCP, for pairs without an NCCL link. cuda_ipc: two processes on one GPU; the sender copies
    straight into the receiver's caches through CUDA IPC handles. A cuda_ipc sender whose
    receiver is on another host or GPU (or off CUDA) falls back to zmq for that pair."""
    host: str = "127.0.0.1"
    """Receiver: the interface its control socket and per-pair TCPStores bind to."""
    port: int = 0
    """Receiver's control port; 0 picks a free one (read it from `receiver.address`)."""
    timeout_s: float = 30.0
    """Default deadline of one transfer, from `expect` / `send` to DONE."""
    connect_timeout_s: float = 20.0
    """Handshake plus communicator construction of a new pair."""
    idle_evict_s: float = 300.0
    """A pair unused this long is torn down by its sender (its communicator freed; the
    receiver lets go after twice this); rebuilt on next use."""
    max_pairs: int = 64
    """torch transport: most pairs one sender keeps (each NCCL communicator holds GPU memory);
    one more evicts the least recently used pair with nothing in flight."""
    probe_bytes: int = 4 << 20
    """Size of the bandwidth probe each new pair runs (0: no probe)."""
    probe_rounds: int = 2
    coalesce_below_bytes: int = 0
    """torch transport: a direct message (one block run's K or V of one layer) below this
    goes staged instead, K and V of whole layers in one message (0: never for size). Off by
    default: staging costs a pack and an unpack (~0.85-1.4 TB/s each on an H200) and its
    buffers are reused in turn, which on 2x H200 (cluster.bench.bench_kv, 2026-11-27) made
    one request's KV slower than the direct messages it replaces: bf16 4096 tokens 5.48 vs
    2.68 ms, fp8 16384 tokens 15.0 vs 4.47 ms. Small messages are latency-bound (DESIGN.md:
    1 MiB ~12 GB/s, 16 MiB ~278 GB/s), but not by enough to pay for the staging."""
    coalesce_whole_below_bytes: int | None = None
    """torch transport, a request sent whole (`TorchSender.send`): its direct messages below
    this go staged (K and V of whole layers per message, up to `message_bytes`), whatever
    `coalesce_below_bytes` says. None: stream_plan.COALESCE_WHOLE_BYTES where one kernel
    launch packs every layer (CUDA), 0 elsewhere (the CPU pack is a copy per layer and K/V,
    as many host operations as the messages it replaces). A 16-token request of Llama-3-8B's
    shape is 64 messages of 16-32 KiB: posting them costs the host ~0.8 ms on each end
    (~12 us per NCCL operation), moving the bytes ~nothing; staged, it is one message."""
    message_bytes: int = 32 << 20
    """torch transport: what one staged message of a request sent whole fills up to with
    whole layers (a layer-wise stream sends one layer per message, after its compute)."""
    tick_s: float = 0.02
    """Watchdog period: deadlines fire at most this late."""
