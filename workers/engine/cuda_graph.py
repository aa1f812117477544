"""CUDA-graph runners: steps replayed from graphs captured at fixed bucket shapes (STYLE.md #9).

A decode step of Llama-3-8B launches ~10 kernels per layer; at batch 1 the GPU finishes each
in microseconds, so launching them from Python would cost more than the work. A graph runner
owns static input buffers and one graph per bucket that replays the whole model from them.
A step runs in the smallest bucket that holds it; the padding rows are fake sequences whose
K/V go to a reserved scratch block that the block pool never hands out (the runner allocates
it after the pool's blocks), so they touch nothing real.

`GraphRunner` is what every runner shares: the static buffers (one int64 device tensor
holding input ids, positions, slot mapping, logits indices, seq lens, query starts and block
tables, max_model_len wide), filled from a pinned host mirror with ONE host->device copy per
step; the scratch-block padding; the capture loop; `close`. A subclass says which steps it
takes, the shape (rows, tokens) of each bucket, and what the attention backend may assume on
the host. Attention metadata inside the graphs uses max_seq_len = max_model_len, so the Triton
decode kernel's split count is fixed per bucket (the kernel is correct for any split count)
and the torch backend's padded gather is static.

`CudaGraphRunner` (this file): steps where every sequence has exactly `query_len` new tokens
(1: decode; 1 + K: a speculative verification step, a second runner built for the Triton
backend, whose decode kernel masks by the device seq_lens), one graph per batch-size bucket.
`PrefillGraphRunner` (workers/engine/prefill_graph.py): one sequence's prefill chunk.
Everything else (mixed steps, CPU, `enforce_eager`) runs eagerly.
The caller keeps at most one step in flight (the engine samples on the host every step).

`capture=False` builds a runner that runs the same padded forward eagerly (no graphs, any
device): how the CPU tests check the padding logic the graphs replay.
"""

from __future__ import annotations

import contextlib
import gc
from abc import ABC, abstractmethod

import numpy as np
import torch

from workers.attention.backend import AttentionMetadata
from workers.engine.step_input import StepInput
from workers.model.llama import KVCache, LlamaForCausalLM

_TOKEN_FIELDS = ("input_ids", "positions", "slot_mapping", "logits_indices")
"""One entry per packed token each; seq_lens (one per row) and query_start_loc (rows + 1)
follow, then the block tables."""


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, ... below max_num_seqs, then max_num_seqs itself."""
    buckets, size = [], 1
    while size < max_num_seqs:
        buckets.append(size)
        size *= 2
    return buckets + [max_num_seqs]


def on_device(device: torch.device):
    """`torch.cuda.device(device)` for a CUDA device, a no-op context elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class GraphRunner(ABC):
    """Owns the static buffers and one captured graph per bucket. Built once by ModelRunner
    after the KV cache exists (graphs capture the cache's addresses); `run` replaces the
    model's forward for steps `can_run` accepts."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        buckets: list[int],
        max_model_len: int,
        scratch_block: int,
        capture: bool = True,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = buckets
        self.max_model_len = max_model_len
        self.block_size = kv_caches[0][0].shape[1]
        self.scratch_block = scratch_block
        self.device = kv_caches[0][0].device
        rows, tokens = self._shape(buckets[-1])
        self.width = -(-max_model_len // self.block_size)
        sizes = {f: tokens for f in _TOKEN_FIELDS} | {"seq_lens": rows, "query_start_loc": rows + 1}
        offsets = [int(x) for x in np.cumsum([0, *sizes.values()])]
        self._fields_end = offsets[-1]
        total = self._fields_end + rows * self.width
        cuda = self.device.type == "cuda"
        self._device = torch.zeros(total, dtype=torch.int64, device=self.device)
        self._host = torch.zeros(total, dtype=torch.int64)
        self._host = self._host.pin_memory() if cuda else self._host
        host = self._host.numpy()
        spans = dict(zip(sizes, zip(offsets[:-1], offsets[1:], strict=True), strict=True))
        self._host_fields = {f: host[a:b] for f, (a, b) in spans.items()}
        self._host_tables = host[self._fields_end :].reshape(rows, self.width)
        self._static = {f: self._device[a:b] for f, (a, b) in spans.items()}
        self._block_tables = self._device[self._fields_end :].view(rows, self.width)
        self._copied = torch.cuda.Event() if cuda else None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.captured = capture
        if capture:
            self._capture_all()

    @abstractmethod
    def can_run(self, step: StepInput) -> bool:
        """Whether `run` takes this step (its shape fits a bucket)."""

    @abstractmethod
    def bucket_for_step(self, step: StepInput) -> int:
        """The smallest bucket that holds the step (`bucket_for` its size)."""

    def bucket_for(self, size: int) -> int:
        """The smallest bucket >= size (sequences or tokens, as the runner counts them)."""
        return next(bucket for bucket in self.buckets if bucket >= size)

    @abstractmethod
    def _shape(self, bucket: int) -> tuple[int, int]:
        """(rows, tokens) of a bucket's graph: a step fills its rows and tokens first, the
        padding rows share the rest equally (the last one takes any remainder)."""

    @abstractmethod
    def _query_layout(self, bucket: int) -> tuple[int, tuple[int, ...], bool]:
        """(max_query_len, query_start_loc_host, device_query_lens) of a bucket's metadata:
        what the attention backend may decide on the host, valid for every step replayed."""

    def close(self) -> None:
        """Frees the graphs. Graphs holding captured NCCL calls keep
        `destroy_process_group` waiting forever (pytorch/pytorch#115388), so a rank of a TP
        group closes its runner before it leaves the group. The runner replays nothing after."""
        for graph, _ in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def run(self, step: StepInput) -> torch.Tensor:
        """Final hidden states of the rows step.logits_indices names, in that order."""
        bucket = self.bucket_for_step(step)
        self._fill_host(step, bucket)
        if self.captured:
            # The graph's first node copies the pinned mirror up (captured in
            # _capture_buckets): no separate copy call between the host's fill and the replay.
            graph, hidden = self._graphs[bucket]
            graph.replay()  # on the runner's device: ModelRunner.forward_stage makes it current
            self._copied.record()
        else:
            self._upload(self._shape(bucket)[0])
            hidden = self._forward(bucket)
        indices = self._static["logits_indices"][: len(step.logits_indices)]
        return hidden.index_select(0, indices)

    def replay_seconds(self, bucket: int, iters: int = 50) -> float:
        """Seconds per replay of a captured bucket's graph on whatever its static inputs hold
        (CUDA events, no host work between replays): the GPU side of a step, for benchmarks.
        The replays write K/V where the last step's slots point (the scratch block for
        padding rows), so call it between requests, not while one is decoding."""
        graph, _ = self._graphs[bucket]
        with on_device(self.device):
            graph.replay()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                graph.replay()
            end.record()
            end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    def _fill_host(self, step: StepInput, bucket: int) -> None:
        # The previous step's copy must have left the pinned mirror before it is rewritten.
        if self._copied is not None:
            self._copied.synchronize()
        n, tokens, fields = step.num_seqs, step.num_tokens, self._host_fields
        fields["input_ids"][:tokens] = step.token_ids
        fields["positions"][:tokens] = step.positions
        fields["slot_mapping"][:tokens] = step.slot_mapping
        fields["seq_lens"][:n] = step.seq_lens
        fields["query_start_loc"][: n + 1] = step.query_start_loc
        fields["logits_indices"][: len(step.logits_indices)] = step.logits_indices
        # Table columns past a sequence's own blocks keep stale (valid) block ids: attention
        # never reads past seq_len, so rewriting the whole width would only cost time.
        for row, table in enumerate(step.block_tables):
            self._host_tables[row, : len(table)] = table[: self.width]
        self._fill_padding(n, tokens, *self._shape(bucket))

    def _fill_padding(self, first_row: int, first_token: int, rows: int, tokens: int) -> None:
        """Rows first_row..rows-1 become sequences of the tokens first_token..tokens-1 (split
        equally, the last row takes the remainder), each at positions 0.. of its own, living
        in the scratch block: every slot and every table column they read is the scratch
        block's (a row longer than a block wraps around in it)."""
        num_rows = rows - first_row
        if num_rows == 0:
            return
        fields, count = self._host_fields, tokens - first_token
        lens = np.full(num_rows, count // num_rows)
        lens[-1] += count % num_rows
        ends = first_token + np.cumsum(lens)
        positions = np.arange(count) - np.repeat(ends - lens - first_token, lens)
        fields["input_ids"][first_token:tokens] = 0
        fields["positions"][first_token:tokens] = positions
        fields["slot_mapping"][first_token:tokens] = (
            self.scratch_block * self.block_size + positions % self.block_size)
        fields["seq_lens"][first_row:rows] = lens
        fields["query_start_loc"][first_row + 1 : rows + 1] = ends
        columns = max(1, -(-int(lens.max()) // self.block_size))
        self._host_tables[first_row:rows, :columns] = self.scratch_block

    def _upload(self, rows: int) -> None:
        self._copy_up(rows)
        if self._copied is not None:
            self._copied.record()

    def _copy_up(self, rows: int) -> None:
        """The pinned host mirror's fields and `rows` block-table rows -> the device buffers
        (one copy; inside each captured graph, so a replay reads what `_fill_host` wrote)."""
        used = self._fields_end + rows * self.width
        self._device[:used].copy_(self._host[:used], non_blocking=self._copied is not None)

    def _forward(self, bucket: int) -> torch.Tensor:
        static = self._static
        rows, tokens = self._shape(bucket)
        max_query_len, starts_host, device_query_lens = self._query_layout(bucket)
        meta = AttentionMetadata(
            slot_mapping=static["slot_mapping"][:tokens],
            query_start_loc=static["query_start_loc"][: rows + 1].to(torch.int32),
            seq_lens=static["seq_lens"][:rows].to(torch.int32),
            block_tables=self._block_tables[:rows].to(torch.int32),
            max_query_len=max_query_len,
            max_seq_len=self.max_model_len,
            query_start_loc_host=starts_host,
            seq_lens_host=(self.max_model_len,) * rows,
            device_query_lens=device_query_lens,
        )
        positions = static["positions"][:tokens]
        return self.model(static["input_ids"][:tokens], positions, self.kv_caches, meta)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self._host_tables[:] = self.scratch_block
        # A garbage collection during capture may destroy an older runner's graphs, which
        # CUDA forbids while a stream captures (it invalidates this capture): collect now,
        # and keep the collector off until the last graph is captured.
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            # Capture follows the current device's stream while the kernels go to the
            # tensors' device: with another device current (a process that touched a second
            # GPU) the graphs would capture nothing and replay stale outputs.
            with on_device(self.device):
                self._capture_buckets()
        finally:
            if was_enabled:
                gc.enable()
        torch.cuda.synchronize(self.device)

    def _capture_buckets(self) -> None:
        pool = None
        # Largest first: smaller graphs then fit in the memory pool the first one made.
        for bucket in reversed(self.buckets):
            rows, tokens = self._shape(bucket)
            self._fill_padding(0, 0, rows, tokens)
            self._upload(rows)
            self._forward(bucket)  # warm-up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._copy_up(rows)
                hidden = self._forward(bucket)
            pool = graph.pool() if pool is None else pool
            self._graphs[bucket] = (graph, hidden)


class CudaGraphRunner(GraphRunner):
    """Steps where every sequence has exactly `query_len` new tokens (decode: one), one graph
    per batch-size bucket (1, 2, 4, ..., max_num_seqs)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        max_num_seqs: int,
        max_model_len: int,
        scratch_block: int,
        query_len: int = 1,
        capture: bool = True,
    ):
        self.query_len = query_len
        assert query_len <= kv_caches[0][0].shape[1], "padding rows live in one scratch block"
        super().__init__(model, kv_caches, batch_buckets(max_num_seqs), max_model_len,
                         scratch_block, capture)

    def can_run(self, step: StepInput) -> bool:
        """Every sequence has exactly query_len new tokens (decode: one), and the step is no
        larger than the largest bucket."""
        q = self.query_len
        if step.tree_masks is not None:  # tree verification runs eagerly
            return False
        if not (0 < step.num_seqs <= self.buckets[-1] and step.num_tokens == step.num_seqs * q):
            return False
        return q == 1 or step.query_start_loc == list(range(0, step.num_tokens + 1, q))

    def bucket_for_step(self, step: StepInput) -> int:
        return self.bucket_for(step.num_seqs)

    def _shape(self, bucket: int) -> tuple[int, int]:
        return bucket, bucket * self.query_len

    def _query_layout(self, bucket: int) -> tuple[int, tuple[int, ...], bool]:
        q = self.query_len
        return q, tuple(range(0, bucket * q + 1, q)), False
