"""`ModelRunner`: one worker rank's model, its KV cache, and one forward pass per step.

Built from an EngineConfig (and a ParallelContext for TP/PP ranks). It resolves device and
dtype, loads the model (checkpoint or dummy weights), sizes and allocates the paged KV cache,
and turns each StepInput into float32 logits. Called by the engine through its StageDriver
(workers/engine/stage_driver.py); KV transfer reads and writes `kv_caches` directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from kernels.kv_quant import FP8_DTYPE
from workers.attention.registry import get_attention_backend
from workers.attention.torch_backend import padded_decode_bytes
from workers.config import EngineConfig
from workers.engine.cuda_graph import CudaGraphRunner, on_device
from workers.engine.prefill_graph import build_prefill_graph_runner
from workers.engine.step_input import StepInput
from workers.engine.step_tensors import build_step_tensors
from workers.errors import InvalidParameter
from workers.model.config import ModelConfig
from workers.model.llama import IntermediateTensors, KVCache, LlamaForCausalLM
from workers.model.parallel import SINGLE, ParallelContext, layer_range_for_stage
from workers.model.quant.load_mode import dummy_scheme
from workers.model.weights import load_checkpoint, load_dummy

CPU_KV_CACHE_BYTES = 256 * 2**20
TORCH_GRAPH_GATHER_LIMIT = 2**30
"""Largest padded K/V gather (bytes) for which the torch backend's decode is graphed."""
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, model_config: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto' is the checkpoint's dtype on CUDA and float32 on CPU (no fast half matmuls)."""
    if name == "auto":
        name = model_config.torch_dtype if device.type == "cuda" else "float32"
    if name not in _DTYPES:
        raise InvalidParameter("dtype", f"{name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def resolve_kv_cache_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """'auto' is the model's dtype; 'fp8' is e4m3 (kernels/kv_quant.py)."""
    kv_dtypes = {"auto": dtype, "fp8": FP8_DTYPE}
    if name not in kv_dtypes:
        raise InvalidParameter("kv_cache_dtype", f"{name!r} is not one of {sorted(kv_dtypes)}")
    return kv_dtypes[name]


def resolve_max_model_len(requested: int | None, model_config: ModelConfig) -> int:
    """The context limit: max_position_embeddings, or the sliding window if smaller (full
    attention equals windowed attention only within the window)."""
    limit = model_config.max_position_embeddings
    if model_config.sliding_window is not None:
        limit = min(limit, model_config.sliding_window)
    if requested is not None and requested > limit:
        raise InvalidParameter(
            "max_model_len", f"{requested} exceeds the model's limit of {limit} tokens"
        )
    return requested or limit


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Parameters are created directly in the serving dtype: no float32 copy of a big model.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelRunner:
    """Public state, fixed after construction:
    - `model_config` (ModelConfig), `device`, `dtype`, `kv_cache_dtype`, `max_model_len`;
    - `layer_range`: the [start, end) layers this pipeline stage owns;
    - `kv_caches`: one (K, V) per owned layer, each
      [num_blocks, block_size, num_local_kv_heads, head_dim]; block ids index axis 0;
    - `num_blocks`, `block_size`, `kv_bytes_per_block`;
    - `graph_runner`: the CudaGraphRunner replaying decode-only steps (None on CPU, with
      `enforce_eager`, on a pipeline stage that is not the whole model, or for the torch
      backend where its padded decode gather exceeds TORCH_GRAPH_GATHER_LIMIT);
      `prefill_graph_runner`: one sequence's 9..512-token prefill steps (Triton backend,
      where there is a graph_runner; workers/engine/prefill_graph.py).
    `execute(step)` is what changes anything (the cache slots a step writes); in a TP/PP
    group the driver rank runs steps through its StageDriver (workers/engine/stage_driver.py)
    and the other ranks call `run_pipeline(step)` with the steps it hands them.

    Each layer's cache tensor has one block more than `num_blocks`: the scratch block where
    CUDA-graph padding rows write. `kv_caches` are views without it, so the block pool, KV
    transfer and everything else see exactly `num_blocks` blocks."""

    def __init__(self, config: EngineConfig, parallel: ParallelContext | None = None):
        self.config = config
        self.parallel = parallel or SINGLE
        self.device = resolve_device(config.device)
        self.model_config = ModelConfig.from_path(config.model)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype)
        self.max_model_len = resolve_max_model_len(config.max_model_len, self.model_config)
        self.block_size = config.cache.block_size
        self.layer_range = layer_range_for_stage(
            self.model_config.num_layers, self.parallel.pp_rank, self.parallel.pp_size
        )
        self.model = self._load_model()
        self.num_blocks = self._size_cache()
        self._full_caches = self._allocate_cache()
        self.kv_caches: list[KVCache] = [
            (k[: self.num_blocks], v[: self.num_blocks]) for k, v in self._full_caches
        ]
        self.graph_runner = self._build_graph_runner()
        self.verify_graph_runner = self._build_verify_graph_runner()
        self.prefill_graph_runner = build_prefill_graph_runner(
            config, self.model, self._full_caches, self.max_model_len, self.num_blocks,
            decode_graphs=self.graph_runner is not None)
        self.last_hidden: torch.Tensor | None = None
        """The last stage's final hidden states of the latest step's logits rows (Medusa
        heads read them, workers/spec/medusa.py)."""

    @property
    def num_local_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]

    @property
    def num_local_kv_heads(self) -> int:
        return len(self.kv_head_range)

    @property
    def kv_head_range(self) -> range:
        """The model's KV heads this rank's cache holds (replicated where TP exceeds them)."""
        return self.parallel.kv_head_range(self.model_config.num_kv_heads)

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes of K and V of one block across this rank's layers."""
        per_layer = self.block_size * self.num_local_kv_heads * self.model_config.head_dim
        return 2 * self.num_local_layers * per_layer * self.kv_cache_dtype.itemsize

    def _load_model(self) -> LlamaForCausalLM:
        backend = get_attention_backend(self.config.attention_backend)
        # The one switch for fused norm/rope/activation kernels (workers/model/ops.py).
        fused = self.config.attention_backend == "triton" and self.device.type == "cuda"
        with torch.device(self.device), _default_dtype(self.dtype):
            model = LlamaForCausalLM(
                self.model_config, backend, self.parallel, self.layer_range,
                fused_ops=fused, max_positions=self.max_model_len,
            )
        if self.config.load_format == "dummy":
            scheme = dummy_scheme(self.config.model, self.config.quantization)
            load_dummy(model, seed=self.config.seed, scheme=scheme)
        else:
            load_checkpoint(model, self.config.model, self.config.quantization,
                            self.config.cache.kv_cache_dtype)
        return model.eval()

    def _size_cache(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if cache.kv_cache_memory is not None:
            budget = cache.kv_cache_memory
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - int(total * (1 - cache.gpu_memory_utilization))
        else:
            budget = CPU_KV_CACHE_BYTES
        # More blocks than max_num_seqs full-length sequences could ever use is waste.
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        useful = self.config.scheduler.max_num_seqs * blocks_per_seq
        num_blocks = min(budget // self.kv_bytes_per_block, useful)
        if self.parallel.world_size > 1:
            # One block id means the same block on every rank: the group's smallest pool.
            count = torch.tensor([num_blocks], dtype=torch.int64)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            num_blocks = int(count.item())
        if num_blocks < 1:
            raise InvalidParameter(
                "kv_cache_memory",
                f"{budget} bytes hold no KV block of {self.kv_bytes_per_block} bytes",
            )
        return num_blocks

    def _allocate_cache(self) -> list[KVCache]:
        shape = (
            self.num_blocks + 1,  # + the scratch block (see class doc)
            self.block_size,
            self.num_local_kv_heads,
            self.model_config.head_dim,
        )
        return [
            (
                torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
                torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
            )
            for _ in range(self.num_local_layers)
        ]

    def _build_graph_runner(self) -> CudaGraphRunner | None:
        whole_model = self.num_local_layers == self.model_config.num_layers
        if self.device.type != "cuda" or self.config.enforce_eager or not whole_model:
            return None
        if self.config.attention_backend == "torch":
            # The torch reference pads every graphed decode to max_model_len; where that
            # gather would not fit comfortably, it stays eager (it is the slow reference).
            gather = padded_decode_bytes(
                self.config.scheduler.max_num_seqs, self.max_model_len,
                self.num_local_kv_heads, self.model_config.head_dim,
            )
            if gather > TORCH_GRAPH_GATHER_LIMIT:
                return None
        return CudaGraphRunner(
            self.model,
            self._full_caches,
            max_num_seqs=self.config.scheduler.max_num_seqs,
            max_model_len=self.max_model_len,
            scratch_block=self.num_blocks,
        )

    def _build_verify_graph_runner(self) -> CudaGraphRunner | None:
        """Speculative verification steps (1 + K tokens for every sequence) replayed from
        graphs like decode (workers/spec/): Triton backend only, whose decode kernel masks
        by the device seq_lens (the torch reference's multi-token path reads host lengths)."""
        spec = self.config.speculative
        if (spec.method is None or spec.num_speculative_tokens == 0 or self.graph_runner is None
                or self.config.attention_backend != "triton" or self.config.role == "prefill"):
            return None
        return CudaGraphRunner(
            self.model, self._full_caches, max_num_seqs=self.config.scheduler.max_num_seqs,
            max_model_len=self.max_model_len, scratch_block=self.num_blocks,
            query_len=1 + spec.num_speculative_tokens,
        )

    def close(self) -> None:
        """Frees the CUDA graphs: call before leaving a TP group (see CudaGraphRunner.close);
        later steps run eagerly."""
        for graphs in (self.graph_runner, self.verify_graph_runner, self.prefill_graph_runner):
            if graphs is not None:
                graphs.close()
        self.graph_runner = self.verify_graph_runner = self.prefill_graph_runner = None

    @torch.inference_mode()
    def execute(
        self, step: StepInput, layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Float32 logits [len(step.logits_indices), vocab] of a step through every layer on
        this rank (pp_size 1; the ranks of a TP group run it in step). The driver rank of a
        TP/PP group runs its steps through a StageDriver (workers/engine/stage_driver.py),
        which hands them to the other ranks first."""
        if self.parallel.pp_size > 1:
            raise RuntimeError("a pipeline stage runs steps through StageDriver or run_pipeline")
        return self.forward_stage(step, None, layer_done)

    @torch.inference_mode()
    def run_pipeline(
        self, step: StepInput, layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor | None:
        """A non-driver rank's part of one step (the driver's goes through StageDriver):
        receive the previous stage's hidden states, run the owned layers, hand the result to
        the next stage, or the logits to the driver from the last stage's TP rank 0. Returns
        the logits on the last stage's ranks; None elsewhere. `layer_done`: as in
        `forward_stage` (this rank's end of a per-layer KV stream). Steps come in the driver's
        order, each stage takes them one after the other, so a later micro-batch always
        sees the KV an earlier one wrote. In inference mode: the other ranks call it
        directly, and their weights are inference tensors."""
        parallel = self.parallel
        intermediate = None
        if not parallel.is_first_stage:
            hidden = torch.empty(step.num_tokens, self.model_config.hidden_size,
                                 dtype=self.dtype, device=self.device)
            intermediate = IntermediateTensors(parallel.recv_from_prev_stage(hidden))
        out = self.forward_stage(step, intermediate, layer_done)
        if isinstance(out, IntermediateTensors):
            parallel.send_to_next_stage(out.hidden)
            return None
        if parallel.pp_size > 1 and parallel.tp_rank == 0 and step.logits_indices:
            parallel.send_to_driver(out)
        return out

    def forward_stage(
        self, step: StepInput, intermediate: IntermediateTensors | None = None,
        layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """Float32 logits [len(step.logits_indices), vocab] on the last pipeline stage (the
        hidden states for the next stage otherwise). Writes this step's KV into kv_caches,
        calling `layer_done(local_layer)` after each layer's (eager steps only). Decode-only
        and single-sequence prefill steps replay a CUDA graph when there is a graph runner
        for them (and no `layer_done`)."""
        # Triton launches on the current device, not the tensors': pin it to this runner's
        # (a process may drive several GPUs, e.g. a test with a KV pair on two).
        with on_device(self.device):
            graphs = (self.graph_runner, self.verify_graph_runner, self.prefill_graph_runner)
            graphs = graphs if layer_done is None else ()
            graph = next((g for g in graphs if g is not None and g.can_run(step)), None)
            if graph is not None:
                self.last_hidden = graph.run(step)
                return self.model.compute_logits(self.last_hidden)
            tensors = build_step_tensors(step, self.device)
            out = self.model(
                tensors.input_ids, tensors.positions, self._full_caches, tensors.meta,
                intermediate, layer_done,
            )
            if isinstance(out, IntermediateTensors):
                return out
            self.last_hidden = out.index_select(0, tensors.logits_indices)
            return self.model.compute_logits(self.last_hidden)
