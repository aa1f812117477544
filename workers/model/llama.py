"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over packed tokens and a paged KV
cache.

`forward(input_ids, positions, kv_caches, meta)` takes the step's tokens of all sequences
packed on one axis (see workers/engine/step_input.py) and returns hidden states; `compute_logits`
turns selected hidden states into float32 logits. Tensor parallelism enters only through the
`ParallelContext` given to the parallel layers (workers/model/linear.py). A pipeline stage
builds only its `layer_range` and reads `kv_caches[i - layer_range[0]]` for layer i.

Parameter loading: `checkpoint_map()` lists, per Hugging Face tensor name, the module,
parameter and merged shard it fills, so weights.py needs no per-architecture code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kernels.norm_handoff import AddNorm, NormedRows
from workers.attention.backend import AttentionBackend, AttentionMetadata
from workers.model.config import ModelConfig
from workers.model.linear import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from workers.model.ops import Rope, TorchOps, model_ops
from workers.model.parallel import SINGLE, ParallelContext
from workers.model.rms_norm import RMSNorm
from workers.model.rotary import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CheckpointSlot:
    """Where one checkpoint tensor goes: `module.load(param_name, shard, tensor)`."""

    module: nn.Module
    param_name: str
    shard: int

    @property
    def full_shape(self) -> tuple[int, ...]:
        return self.module.full_shape(self.param_name, self.shard)

    def load(self, tensor: torch.Tensor) -> None:
        self.module.load(self.param_name, self.shard, tensor)


@dataclass
class IntermediateTensors:
    """What a non-last pipeline stage hands the next one."""

    hidden: torch.Tensor


class Attention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        backend: AttentionBackend,
        parallel: ParallelContext,
        ops: TorchOps,
    ):
        super().__init__()
        self.ops = ops
        self.num_heads = parallel.shard(cfg.num_heads)
        # Fewer kv heads than TP ranks: each rank holds the one its query heads read.
        kv_heads = parallel.kv_head_range(cfg.num_kv_heads)
        self.num_kv_heads = len(kv_heads)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.backend = backend
        # FP8 KV cache scales (read only for an fp8 cache; kernels/kv_quant.py): the
        # checkpoint's (workers/model/kv_scales.py) or 1.0, vLLM's default without them; both
        # fixed at load, so prefill and decode workers loading one checkpoint agree.
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        q_rows = self.num_heads * cfg.head_dim
        kv_rows = (kv_heads.start * cfg.head_dim, self.num_kv_heads * cfg.head_dim)
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size, sizes, cfg.qkv_bias, parallel,
            [(parallel.tp_rank * q_rows, q_rows), kv_rows, kv_rows],
        )
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, cfg.o_bias, parallel)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self, x: torch.Tensor | NormedRows, rope: Rope, kv_cache: KVCache,
        meta: AttentionMetadata, add_norm: AddNorm | None = None,
    ) -> torch.Tensor | tuple[NormedRows, torch.Tensor]:
        """The attention block's output; with `add_norm`, o_proj's (NormedRows, residual)."""
        n = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.ops.attend(self.backend, q, k, v, rope, kv_cache, meta, self.scale,
                              self.k_scale, self.v_scale)
        return self.o_proj(out.reshape(n, q_size), add_norm=add_norm)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelContext, ops: TorchOps):
        super().__init__()
        self.ops = ops
        inter = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [inter, inter], False, parallel)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, False, parallel)

    def forward(
        self, x: torch.Tensor | NormedRows, add_norm: AddNorm | None = None,
    ) -> torch.Tensor | tuple[NormedRows, torch.Tensor]:
        """The MLP's output; with `add_norm`, down_proj's (NormedRows, residual)."""
        gate_up = self.gate_up_proj(x)
        if self.ops.fused and self.down_proj.fuses_activation:
            # The quantized down projection applies silu(gate) * up as it reads its input
            # (same roundings as the activation kernel): one launch fewer per layer.
            return self.down_proj(gate_up, gated=True, add_norm=add_norm)
        return self.down_proj(self.ops.silu_and_mul(gate_up), add_norm=add_norm)


class DecoderLayer(nn.Module):
    """Pre-norm block. The residual stream travels beside the hidden states, so each
    residual add is fused into the RMSNorm after it (layer i's last add is done by layer
    i + 1's input norm, or the final norm).

    Between two quantized projections at decode sizes (o_proj -> post-attention norm ->
    gate_up_proj, and down_proj -> the next layer's input norm -> its qkv_proj) the norm is
    no kernel of its own: the first projection adds the residual and hands the second a
    NormedRows (kernels/norm_handoff.py AddNorm), two launches fewer per layer. Then this
    layer returns (NormedRows, residual) and the next one starts from them."""

    def __init__(
        self,
        cfg: ModelConfig,
        backend: AttentionBackend,
        parallel: ParallelContext,
        ops: TorchOps,
    ):
        super().__init__()
        self.ops = ops
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend, parallel, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, parallel, ops)
        self.next_layer: tuple[DecoderLayer, ...] = ()
        """The next layer of this model, if any (a tuple: not a registered submodule)."""

    def norm_handoffs(self, rows: int, residual: torch.Tensor | None) -> tuple[bool, bool]:
        """Whether, for a step of `rows` rows, the post-attention norm and the next layer's
        input norm are finished by the projections around them."""
        if not self.ops.fuses_norms or residual is None:
            return False, False
        post = (self.self_attn.o_proj.hands_norm(rows)
                and self.mlp.gate_up_proj.takes_normed(rows))
        following = bool(self.next_layer) and (
            self.mlp.down_proj.hands_norm(rows)
            and self.next_layer[0].self_attn.qkv_proj.takes_normed(rows))
        return post, following

    def forward(
        self,
        x: torch.Tensor | NormedRows,
        residual: torch.Tensor | None,
        rope: Rope,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor | NormedRows, torch.Tensor]:
        """(mlp output, residual before it): their sum is this layer's output. Or (the next
        layer's input, normed and handed on, this layer's output)."""
        if isinstance(x, NormedRows):  # the previous layer's down_proj did the input norm
            h = x
        elif residual is None:
            residual, h = x, self.ops.rms_norm(self.input_layernorm, x)
        else:
            h, residual = self.ops.rms_norm(self.input_layernorm, x, residual)
        post, following = self.norm_handoffs(h.shape[0], residual)
        if post:
            norm = self.post_attention_layernorm
            h, residual = self.self_attn(h, rope, kv_cache, meta,
                                         AddNorm(residual, norm.weight, norm.eps))
        else:
            h = self.self_attn(h, rope, kv_cache, meta)
            h, residual = self.ops.rms_norm(self.post_attention_layernorm, h, residual)
        if following:
            norm = self.next_layer[0].input_layernorm
            return self.mlp(h, AddNorm(residual, norm.weight, norm.eps))
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Serves every supported architecture; differences are flags in ModelConfig."""

    def __init__(
        self,
        cfg: ModelConfig,
        backend: AttentionBackend,
        parallel: ParallelContext = SINGLE,
        layer_range: tuple[int, int] | None = None,
        fused_ops: bool = False,
        max_positions: int | None = None,
    ):
        """`fused_ops`: Triton kernels for norm/rope/activation (CUDA only, see ops.py);
        `max_positions`: rows of their cos/sin cache (default max_position_embeddings)."""
        super().__init__()
        self.config = cfg
        self.parallel = parallel
        self.layer_range = layer_range or (0, cfg.num_layers)
        start, end = self.layer_range
        if not 0 <= start < end <= cfg.num_layers:
            raise ValueError(f"layer_range {self.layer_range} outside 0..{cfg.num_layers}")
        self.has_embedding = start == 0
        self.has_head = end == cfg.num_layers
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.ops = model_ops(
            fused_ops, self.rotary, max_positions or cfg.max_position_embeddings
        )
        if self.has_embedding:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel)
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(cfg, backend, parallel, self.ops) for i in range(start, end)}
        )
        for i in range(start, end - 1):
            self.layers[str(i)].next_layer = (self.layers[str(i + 1)],)
        if self.has_head:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, parallel)
            if cfg.tie_word_embeddings and self.has_embedding:
                self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        intermediate: IntermediateTensors | None = None,
        layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """Hidden states [num_tokens, hidden] after the final norm on the last stage; an
        IntermediateTensors for the next stage otherwise. `layer_done(i)` is called as soon
        as local layer i's kernels are queued (its KV written in stream order): KV transfer
        posts that layer's sends there, so they overlap the remaining layers."""
        x = self.embed_tokens(input_ids) if self.has_embedding else intermediate.hidden
        rope = self.ops.rope(positions, x.dtype)
        start = self.layer_range[0]
        residual = None
        for index, layer in self.layers.items():
            x, residual = layer(x, residual, rope, kv_caches[int(index) - start], meta)
            if layer_done is not None:
                layer_done(int(index) - start)
        if not self.has_head:
            return IntermediateTensors(x + residual)
        return self.ops.rms_norm(self.norm, x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [rows, vocab_size], identical on every TP rank."""
        return self.lm_head(hidden)

    def checkpoint_map(self) -> dict[str, CheckpointSlot]:
        """Hugging Face tensor name -> where it loads, for the tensors this rank needs."""
        slots: dict[str, CheckpointSlot] = {}
        if self.has_embedding:
            slots["model.embed_tokens.weight"] = CheckpointSlot(self.embed_tokens, "weight", 0)
        for index, layer in self.layers.items():
            slots.update(_layer_slots(f"model.layers.{index}.", layer))
        if self.has_head:
            slots["model.norm.weight"] = CheckpointSlot(self.norm, "weight", 0)
            if not self.config.tie_word_embeddings:
                slots["lm_head.weight"] = CheckpointSlot(self.lm_head, "weight", 0)
            elif not self.has_embedding:
                # A last stage without the embedding loads the tied matrix into its head.
                slots["model.embed_tokens.weight"] = CheckpointSlot(self.lm_head, "weight", 0)
        return slots


def _layer_slots(prefix: str, layer: DecoderLayer) -> dict[str, CheckpointSlot]:
    attn, mlp = layer.self_attn, layer.mlp
    slots = {
        prefix + "input_layernorm.weight": CheckpointSlot(layer.input_layernorm, "weight", 0),
        prefix + "post_attention_layernorm.weight": CheckpointSlot(
            layer.post_attention_layernorm, "weight", 0
        ),
        prefix + "self_attn.o_proj.weight": CheckpointSlot(attn.o_proj, "weight", 0),
        prefix + "mlp.gate_proj.weight": CheckpointSlot(mlp.gate_up_proj, "weight", 0),
        prefix + "mlp.up_proj.weight": CheckpointSlot(mlp.gate_up_proj, "weight", 1),
        prefix + "mlp.down_proj.weight": CheckpointSlot(mlp.down_proj, "weight", 0),
    }
    params = ["weight", "bias"] if attn.qkv_proj.bias is not None else ["weight"]
    for param in params:
        for shard, name in enumerate(("q_proj", "k_proj", "v_proj")):
            slots[f"{prefix}self_attn.{name}.{param}"] = CheckpointSlot(attn.qkv_proj, param, shard)
    if attn.o_proj.bias is not None:
        slots[prefix + "self_attn.o_proj.bias"] = CheckpointSlot(attn.o_proj, "bias", 0)
    if attn.q_norm is not None:
        slots[prefix + "self_attn.q_norm.weight"] = CheckpointSlot(attn.q_norm, "weight", 0)
        slots[prefix + "self_attn.k_norm.weight"] = CheckpointSlot(attn.k_norm, "weight", 0)
    return slots
