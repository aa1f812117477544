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

Invariants: graphs are only used on CUDA, for steps where every sequence has exactly
`query_len` new tokens (1: decode; 1 + K: a speculative verification step, a second runner
built for the Triton backend, whose decode kernel masks by the device seq_lens); everything
else (prefill, chunks, mixed verification, CPU, `enforce_eager`) runs eagerly.
The caller keeps at most one step in flight (the engine samples on the host every step).
"""

from __future__ import annotations

import gc

import torch

from workers.attention.backend import AttentionMetadata
from workers.engine.step_input import StepInput
from workers.model.llama import KVCache, LlamaForCausalLM

_TOKEN_FIELDS = ("input_ids", "positions", "slot_mapping", "logits_indices")
"""Per packed token (rows * query_len each); seq_lens follows, one per row."""


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
        query_len: int = 1,
    ):
        self.model = model
        self.query_len = query_len
        self.kv_caches = kv_caches
        self.buckets = batch_buckets(max_num_seqs)
        self.max_model_len = max_model_len
        self.block_size = kv_caches[0][0].shape[1]
        self.scratch_block = scratch_block
        self.device = kv_caches[0][0].device
        assert query_len <= self.block_size, "padding rows live in one scratch block"
        rows = self.buckets[-1]
        tokens = rows * query_len
        self.width = -(-max_model_len // self.block_size)
        self._fields_end = len(_TOKEN_FIELDS) * tokens + rows
        total = self._fields_end + rows * self.width
        self._device = torch.zeros(total, dtype=torch.int64, device=self.device)
        self._host = torch.zeros(total, dtype=torch.int64).pin_memory()
        spans = {f: (i * tokens, (i + 1) * tokens) for i, f in enumerate(_TOKEN_FIELDS)}
        spans["seq_lens"] = (len(_TOKEN_FIELDS) * tokens, self._fields_end)
        host = self._host.numpy()
        self._host_fields = {f: host[a:b] for f, (a, b) in spans.items()}
        self._host_tables = host[self._fields_end :].reshape(rows, self.width)
        self._static = {f: self._device[a:b] for f, (a, b) in spans.items()}
        self._block_tables = self._device[self._fields_end :].view(rows, self.width)
        self._query_start_loc = torch.arange(
            0, (rows + 1) * query_len, query_len, dtype=torch.int32, device=self.device)
        self._copied = torch.cuda.Event()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture_all()

    def can_run(self, step: StepInput) -> bool:
        """Every sequence has exactly query_len new tokens (decode: one), and the step is no
        larger than the largest bucket."""
        q = self.query_len
        if step.tree_masks is not None:  # tree verification runs eagerly
            return False
        if not (0 < step.num_seqs <= self.buckets[-1] and step.num_tokens == step.num_seqs * q):
            return False
        return q == 1 or step.query_start_loc == list(range(0, step.num_tokens + 1, q))

    def close(self) -> None:
        """Frees the graphs. Graphs holding captured NCCL calls keep
        `destroy_process_group` waiting forever (pytorch/pytorch#115388), so a rank of a TP
        group closes its runner before it leaves the group. The runner replays nothing after."""
        for graph, _ in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        torch.cuda.synchronize(self.device)

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
        return hidden[: num_seqs * self.query_len].index_select(0, indices)

    def _fill_host(self, step: StepInput, bucket: int) -> None:
        # The previous step's copy must have left the pinned mirror before it is rewritten.
        self._copied.synchronize()
        n, fields = step.num_seqs, self._host_fields
        tokens = step.num_tokens
        fields["input_ids"][:tokens] = step.token_ids
        fields["positions"][:tokens] = step.positions
        fields["slot_mapping"][:tokens] = step.slot_mapping
        fields["seq_lens"][:n] = step.seq_lens
        fields["logits_indices"][: len(step.logits_indices)] = step.logits_indices
        # Table columns past a sequence's own blocks keep stale (valid) block ids: attention
        # never reads past seq_len, so rewriting the whole width would only cost time.
        for row, table in enumerate(step.block_tables):
            self._host_tables[row, : len(table)] = table
        self._fill_padding(n, bucket)

    def _fill_padding(self, start: int, end: int) -> None:
        """Rows start..end-1 become query_len-token sequences living in the scratch block."""
        fields, q = self._host_fields, self.query_len
        first, last = start * q, end * q
        fields["input_ids"][first:last] = 0
        fields["positions"][first:last] = list(range(q)) * (end - start)
        fields["slot_mapping"][first:last] = [self.scratch_block * self.block_size + i
                                              for i in range(q)] * (end - start)
        fields["seq_lens"][start:end] = q
        self._host_tables[start:end, 0] = self.scratch_block

    def _upload(self, bucket: int) -> None:
        used = self._fields_end + bucket * self.width
        self._device[:used].copy_(self._host[:used], non_blocking=True)
        self._copied.record()

    def _forward(self, bucket: int) -> torch.Tensor:
        static, q = self._static, self.query_len
        tokens = bucket * q
        meta = AttentionMetadata(
            slot_mapping=static["slot_mapping"][:tokens],
            query_start_loc=self._query_start_loc[: bucket + 1],
            seq_lens=static["seq_lens"][:bucket].to(torch.int32),
            block_tables=self._block_tables[:bucket].to(torch.int32),
            max_query_len=q,
            max_seq_len=self.max_model_len,
            query_start_loc_host=tuple(range(0, tokens + 1, q)),
            seq_lens_host=(self.max_model_len,) * bucket,
        )
        positions = static["positions"][:tokens]
        return self.model(static["input_ids"][:tokens], positions, self.kv_caches, meta)

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
