"""Engine configuration: frozen dataclasses built once at the entry point and passed down.

Per-role and per-rank copies are made with `dataclasses.replace`. Runtime facts (the number
of KV blocks that fit in memory) live in their own objects, never patched into these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["colocated", "prefill", "decode"]


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None
    """Bytes for the KV cache. None: `gpu_memory_utilization` of free GPU memory on CUDA,
    or 256 MiB on CPU."""
    gpu_memory_utilization: float = 0.85
    num_blocks: int | None = None
    """Fixes the pool size outright (tests force preemption with a tiny pool)."""
    enable_prefix_caching: bool = True
    """Full blocks stay cached by the hash chain of their tokens and are shared by later
    requests with the same prefix (workers/engine/prefix_cache.py)."""
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    """auto: the model's dtype. fp8: e4m3 with per-layer K and V scales, the checkpoint's
    (self_attn.k_scale / v_scale, workers/model/kv_scales.py) or else 1.0 (vLLM's default):
    half the bytes of bf16 per block, in memory and on the wire."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    """Most sequences running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (decode tokens + prefill chunk tokens)."""
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    """If > 0, most prompt tokens one sequence may prefill in one step (forces small chunks)."""
    policy: Literal["fcfs", "priority"] = "fcfs"


SpeculativeMethod = Literal["ngram", "draft", "medusa"]
MAX_SPECULATIVE_TOKENS = 7
"""A verification run is 1 + K query tokens, and the paged decode kernel takes at most 8."""


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding in decode/colocated engines (workers/spec/). `method` None: off."""

    method: SpeculativeMethod | None = None
    num_speculative_tokens: int = 0
    """K: tokens proposed per sequence per step (a request may ask for fewer, 0 included)."""
    draft_model: str | None = None
    """method 'draft': the draft checkpoint folder (same tokenizer and vocab as the target);
    method 'medusa': the Medusa heads folder (random heads with load_format 'dummy')."""
    ngram_min: int = 1
    ngram_max: int = 4
    """method 'ngram': the longest suffix of 1..ngram_max tokens found earlier in the context
    proposes the tokens that followed it."""
    medusa_tree: Literal["chain", "tree"] = "chain"
    """method 'medusa': propose the heads' top chain, or a static tree of top-k candidates
    verified with a tree attention mask (greedy requests; sampling ones keep the chain).
    Default chain: which is faster on a GPU is not measured yet (workers/bench/bench_spec.py)."""
    medusa_tree_size: int = 7
    """Nodes of the Medusa tree, K..7 (the top chain to depth K plus the likeliest others)."""


@dataclass(frozen=True)
class EngineConfig:
    model: str = ""
    """Path of a Hugging Face checkpoint folder; or a config.json when load_format='dummy'."""
    load_format: Literal["auto", "dummy"] = "auto"
    quantization: Literal["auto", "gguf", "none", "fp8", "int8"] = "auto"
    """`--quantization` (workers/model/quant/load_mode.py). auto: a quantized checkpoint loads
    kept quantized, a GGUF file's Q4_0/Q4_1 projections stay 4-bit on CUDA and are dequantized
    on the CPU; gguf / none: a GGUF file kept 4-bit / dequantized on any device; fp8 / int8: an
    unquantized checkpoint's projections quantized per output channel while loading."""
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "auto"
    """auto: the checkpoint's torch_dtype on CUDA, float32 on CPU."""
    device: str = "auto"
    """auto: cuda if available, else cpu."""
    attention_backend: Literal["torch", "triton"] = "torch"
    max_model_len: int | None = None
    """None: the model's max_position_embeddings."""
    seed: int = 0
    enforce_eager: bool = False
    """Never capture CUDA graphs (the escape hatch); graphs are used only on CUDA anyway."""
    cuda_graph_prefill_tokens: tuple[int, ...] = (*range(16, 257, 16), 320, 384, 448, 512)
    """Token buckets of the CUDA graphs that replay one sequence's prefill step of 9..512 new
    tokens (workers/engine/prefill_graph.py; Triton backend); () turns them off. A step runs
    padded to its bucket, and its matmuls cost in proportion: on an H100 a 200-token step
    took 0.38 ms less TTFT in bucket 224 than in 256, so buckets are 16 tokens apart up to
    256 (the graphs share one memory pool)."""
    role: Role = "colocated"
    tp_size: int = 1
    """Tensor-parallel ranks of this worker (one process each; workers/actors/rank_group.py)."""
    pp_size: int = 1
    """Pipeline stages of this worker; a worker is tp_size x pp_size ranks."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
