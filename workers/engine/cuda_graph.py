"""`CudaGraphRunner`: decode-only steps replayed from CUDA graphs (STYLE.md #9).

A decode step of Llama-3-8B launches ~10 kernels per layer; at batch 1 the GPU finishes each
in microseconds, so launching them from Python would cost more than the work. One graph per
batch-size bucket (1, 2, 4, ..., max_num_seqs) replays the whole model from static input
buffers this runner owns. A step of n sequences runs in the smallest bucket >= n; the padding
rows are fake one-token sequences whose K/V go to a reserved scratch block that the block pool
never hands out (the runner allocates it after the pool's blocks), so they touch nothing real.

Static buffers: one int64 device tensor holding input ids, positions, slot mapping, seq lens,
logits indices and block tables (max_model_len wide), filled from a pinned host mirror with ONE
host->device copy per step. Attention metadata inside the graphs uses max_seq_len =
max_model_len, so the Triton decode kernel's split count is fixed per bucket (the kernel is
correct for any split count) and the torch backend's padded gather is static.

Invariants: graphs are only used on CUDA, for steps where every sequence has exactly one new
token; everything else (prefill, chunks, verification, CPU, `enforce_eager`) runs eagerly.
The caller keeps at most one step in flight (the engine samples on the host every step).
"""

from __future__ import annotations

import gc

import torch

from workers.attention.backend import AttentionMetadata
from workers.engine.step_input import StepInput
from workers.model.llama import KVCache, LlamaForCausalLM

_FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens", "logits_indices")


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, ... below max_num_seqs, then max_num_seqs itself."""
    buckets, size = [], 1
    while size < max_num_seqs:
        buckets.append(size)
        size *= 2
    return buckets + [max_num_seqs]


class CudaGraphRunner:
    """Owns the static buffers and one captured graph per bucket. Built once by ModelRunner
    after the KV cache exists (graphs capture the cache's addresses); `run` replaces the
    model's forward for steps `can_run` accepts."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        max_num_seqs: int,
        max_model_len: int,
        scratch_block: int,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = batch_buckets(max_num_seqs)
        self.max_model_len = max_model_len
        self.block_size = kv_caches[0][0].shape[1]
        self.scratch_block = scratch_block
        self.device = kv_caches[0][0].device
        rows = self.buckets[-1]
        self.width = -(-max_model_len // self.block_size)
        total = len(_FIELDS) * rows + rows * self.width
        self._device = torch.zeros(total, dtype=torch.int64, device=self.device)
        self._host = torch.zeros(total, dtype=torch.int64).pin_memory()
        host = self._host.numpy()
        self._host_fields = {f: host[i * rows : (i + 1) * rows] for i, f in enumerate(_FIELDS)}
        self._host_tables = host[len(_FIELDS) * rows :].reshape(rows, self.width)
        self._static = {
            f: self._device[i * rows : (i + 1) * rows] for i, f in enumerate(_FIELDS)
        }
        self._block_tables = self._device[len(_FIELDS) * rows :].view(rows, self.width)
        self._query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=self.device)
        self._copied = torch.cuda.Event()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture_all()

    def can_run(self, step: StepInput) -> bool:
        """Decode-only (one new token per sequence) and no larger than the largest bucket."""
        return 0 < step.num_seqs <= self.buckets[-1] and step.num_tokens == step.num_seqs

    def bucket_for(self, num_seqs: int) -> int:
        return next(size for size in self.buckets if size >= num_seqs)

    @torch.inference_mode()
    def run(self, step: StepInput) -> torch.Tensor:
        """Final hidden states of the rows step.logits_indices names, in that order."""
        num_seqs, bucket = step.num_seqs, self.bucket_for(step.num_seqs)
        self._fill_host(step, bucket)
        self._upload(bucket)
        graph, hidden = self._graphs[bucket]
        graph.replay()
        indices = self._static["logits_indices"][: len(step.logits_indices)]
        return hidden[:num_seqs].index_select(0, indices)

    def _fill_host(self, step: StepInput, bucket: int) -> None:
        # The previous step's copy must have left the pinned mirror before it is rewritten.
        self._copied.synchronize()
        n, fields = step.num_seqs, self._host_fields
        fields["input_ids"][:n] = step.token_ids
        fields["positions"][:n] = step.positions
        fields["slot_mapping"][:n] = step.slot_mapping
        fields["seq_lens"][:n] = step.seq_lens
        fields["logits_indices"][: len(step.logits_indices)] = step.logits_indices
        # Table columns past a sequence's own blocks keep stale (valid) block ids: attention
        # never reads past seq_len, so rewriting the whole width would only cost time.
        for row, table in enumerate(step.block_tables):
            self._host_tables[row, : len(table)] = table
        self._fill_padding(n, bucket)

    def _fill_padding(self, start: int, end: int) -> None:
        """Rows start..end-1 become one-token sequences living in the scratch block."""
        fields = self._host_fields
        fields["input_ids"][start:end] = 0
        fields["positions"][start:end] = 0
        fields["slot_mapping"][start:end] = self.scratch_block * self.block_size
        fields["seq_lens"][start:end] = 1
        self._host_tables[start:end, 0] = self.scratch_block

    def _upload(self, bucket: int) -> None:
        rows = self.buckets[-1]
        used = len(_FIELDS) * rows + bucket * self.width
        self._device[:used].copy_(self._host[:used], non_blocking=True)
        self._copied.record()

    def _forward(self, bucket: int) -> torch.Tensor:
        static = self._static
        meta = AttentionMetadata(
            slot_mapping=static["slot_mapping"][:bucket],
            query_start_loc=self._query_start_loc[: bucket + 1],
            seq_lens=static["seq_lens"][:bucket].to(torch.int32),
            block_tables=self._block_tables[:bucket].to(torch.int32),
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc_host=tuple(range(bucket + 1)),
            seq_lens_host=(self.max_model_len,) * bucket,
        )
        positions = static["positions"][:bucket]
        return self.model(static["input_ids"][:bucket], positions, self.kv_caches, meta)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        rows = self.buckets[-1]
        self._host_tables[:] = self.scratch_block
        self._fill_padding(0, rows)
        self._upload(rows)
        pool = None
        # A garbage collection during capture may destroy an older runner's graphs, which
        # CUDA forbids while a stream captures (it invalidates this capture): collect now,
        # and keep the collector off until the last graph is captured.
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            # Largest first: smaller graphs then fit in the memory pool the first one made.
            for bucket in reversed(self.buckets):
                self._forward(bucket)  # warm-up: Triton compiles, cuBLAS picks its kernels
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self._forward(bucket)
                pool = graph.pool() if pool is None else pool
                self._graphs[bucket] = (graph, hidden)
        finally:
            if was_enabled:
                gc.enable()
        torch.cuda.synchronize(self.device)
