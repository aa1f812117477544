"""`PrefillGraphRunner`: one sequence's prefill step replayed from a CUDA graph.

A request whose long prefix is cached prefills only its last few hundred tokens: ~6.6 ms of
GPU work for 200 tokens of Llama-3-8B on an H100, but ~354 kernel launches (129 cuBLAS
matmuls) from Python made that step host-bound (TTFT ~23 ms). The same holds for the last
chunk of a chunked prompt and for short prompts. This runner replays such steps from graphs
captured at token buckets (EngineConfig.cuda_graph_prefill_tokens, default 16 .. 512), as
vLLM's piecewise graphs do, here for the whole model.

A step qualifies when it has exactly one sequence with q new tokens, MAX_DECODE_QUERY < q <=
the largest bucket (shorter ones are decode-shaped and go to the decode kernel), no tree mask.
Its context (cached prefix, earlier chunks) may be any length: the attention kernels read
seq_lens from the device. It runs in the smallest bucket >= q as two rows: row 0 the real
sequence (tokens 0..q-1), row 1 a padding sequence of the bucket - q remaining tokens
(possibly none) whose slots and block table are all the scratch block (GraphRunner's
padding), so it touches nothing real. query_start_loc [0, q, bucket] is a device buffer
filled per step; the attention metadata says `device_query_lens`, so the Triton backend runs
one flash-prefill launch over both rows whatever the split (grid from max_q_len = bucket).
Only the Triton backend: the torch reference slices rows by host lengths. Logits: only the
rows the step's logits_indices name (the sequence's last token, if its prompt completes).
"""

from __future__ import annotations

from kernels.paged_decode import MAX_DECODE_QUERY
from workers.config import EngineConfig
from workers.engine.cuda_graph import GraphRunner
from workers.engine.step_input import StepInput
from workers.model.llama import KVCache, LlamaForCausalLM


def prefill_buckets(token_buckets: tuple[int, ...], max_model_len: int) -> list[int]:
    """The configured buckets above MAX_DECODE_QUERY (a step of at most that many tokens is
    decode-shaped: never a prefill graph's) and up to max_model_len (no step is longer, and
    a padding row must stay within the rotary table and a block table's width), ascending."""
    return sorted({b for b in token_buckets if MAX_DECODE_QUERY < b <= max_model_len})


class PrefillGraphRunner(GraphRunner):
    """Single-sequence prefill steps, one graph per token bucket (`prefill_buckets`)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        token_buckets: tuple[int, ...],
        max_model_len: int,
        scratch_block: int,
        capture: bool = True,
    ):
        buckets = prefill_buckets(token_buckets, max_model_len)
        assert buckets, f"no prefill bucket above {MAX_DECODE_QUERY} in {token_buckets}"
        super().__init__(model, kv_caches, buckets, max_model_len, scratch_block, capture)

    def can_run(self, step: StepInput) -> bool:
        return (step.num_seqs == 1 and step.tree_masks is None
                and MAX_DECODE_QUERY < step.num_tokens <= self.buckets[-1])

    def bucket_for_step(self, step: StepInput) -> int:
        return self.bucket_for(step.num_tokens)

    def _shape(self, bucket: int) -> tuple[int, int]:
        return 2, bucket

    def _query_layout(self, bucket: int) -> tuple[int, tuple[int, ...], bool]:
        return bucket, (0, bucket, bucket), True


def build_prefill_graph_runner(
    config: EngineConfig, model: LlamaForCausalLM, kv_caches: list[KVCache],
    max_model_len: int, scratch_block: int, decode_graphs: bool,
) -> PrefillGraphRunner | None:
    """The runner ModelRunner uses, or None: graphs only where decode steps are graphed
    (`decode_graphs`: CUDA, not `enforce_eager`, the whole model on this rank), with the
    Triton backend and at least one usable bucket (`prefill_buckets`)."""
    buckets = config.cuda_graph_prefill_tokens
    if (not decode_graphs or config.attention_backend != "triton"
            or not prefill_buckets(buckets, max_model_len)):
        return None
    return PrefillGraphRunner(model, kv_caches, buckets, max_model_len, scratch_block)
