"""Turns one step's logits into one token per sequence (torch, batched where it pays).

Order of processing, per row: penalties (repetition on prompt + output, presence/frequency
on output) -> banned tokens (EOS/stop ids before min_tokens) -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> a draw from the row's own `torch.Generator`.
A seeded request owns its generator, so its tokens do not depend on what else is in the
batch; the engine seeds it before each draw from (seed, output position) (`position_seed`),
so the draw for token k is the same whatever came before it, on any worker: a request
continued elsewhere after its worker was lost (a migration) draws what the original would
have. The draw is `argmax(p / E)` with E ~ Exp(1) (an exact sample of p, one RNG call per
row). Logprobs are of the raw model distribution (as vLLM's default), top-n per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kernels.argmax import argmax_rows
from workers.device_copy import device_tensor
from workers.engine.sampling_params import SamplingParams

inf = float("inf")

_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """The generator seed for output token `position` of a request seeded with `seed`:
    splitmix64 of both, so neighbouring positions and seeds give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    """None: the sampler's shared generator (reproducible only for the same batch mix)."""
    banned_token_ids: tuple[int, ...] = ()
    """Tokens that must not be drawn this step (EOS and stop ids before min_tokens)."""
    seed: int | None = None
    """If set, `generator` is seeded with it right before this row's draws (a verification
    run's rows are several output positions of one sequence, each with its own seed)."""


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[str, Any] | None]
    """Per row: {'token_id', 'logprob', 'top': [[token_id, logprob], ...]} or None."""


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """In place, only on rows that ask for it (per row: the index sets differ in size)."""
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = device_tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)),
                                 torch.long, logits.device)
            values = logits[i, seen]
            logits[i, seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        if row.output_token_ids and (p.presence_penalty or p.frequency_penalty):
            out = device_tensor(row.output_token_ids, torch.long, logits.device)
            # index_add_, not bincount: CUDA's bincount reads the largest id back to size its
            # output, a synchronization.
            counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device).index_add_(
                0, out, torch.ones(out.shape, dtype=logits.dtype, device=logits.device))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Masks filtered tokens to -inf. top_k [n] (0 = off), top_p [n], min_p [n]."""
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).long()
    kth = sorted_logits.gather(-1, (k - 1).unsqueeze(-1))
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(sorted_logits < kth, -inf), dim=-1)
    # A token is dropped by top-p when the tokens ranked above it already reach top_p.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_before > top_p.unsqueeze(-1)) & (ranks > 0)
    drop |= sorted_probs < min_p.unsqueeze(-1) * sorted_probs[:, :1]
    drop |= sorted_logits < kth
    mask = torch.zeros_like(drop).scatter(-1, sorted_idx, drop)
    return logits.masked_fill(mask, -inf)


class Sampler:
    """Stateless apart from the shared generator for unseeded requests."""

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0):
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        assert logits.shape[0] == len(rows), (logits.shape, len(rows))
        raw_logprobs = self.raw_logprobs(logits, rows)
        logits = self.processed_logits(logits, rows)
        token_ids = self._choose(logits, rows)
        logprobs = [logprobs_of(raw_logprobs, i, token_ids[i], row)
                    for i, row in enumerate(rows)]
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    @staticmethod
    def raw_logprobs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor | None:
        """log_softmax of the raw logits, if any row asks for logprobs."""
        if any(row.params.logprobs is not None for row in rows):
            return torch.log_softmax(logits.float(), dim=-1)
        return None

    @staticmethod
    def processed_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """A float32 copy with penalties applied and banned tokens at -inf."""
        logits = logits.float().clone()
        apply_penalties(logits, rows)
        vocab = logits.shape[-1]
        banned = [i * vocab + t for i, row in enumerate(rows) for t in row.banned_token_ids]
        if banned:  # one fill for the whole batch, not one launch per row
            # index_fill_ takes -inf as a kernel argument; `logits[rows, cols] = -inf` copied
            # it to the GPU as a tensor first, which synchronized with the step's forward.
            logits.view(-1).index_fill_(0, device_tensor(banned, torch.long, logits.device),
                                        -inf)
        return logits

    def exponential_noise(self, shape: torch.Size, rows: list[SamplingRow],
                          device: torch.device, uniform: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """E ~ Exp(1) per [row, token]: the shared generator for all rows, then each row
        with its own generator redrawn from it (seeded first if the row has a seed). With
        `uniform` ([rows]), also fills it with u ~ U[0, 1), a row's own drawn after its E."""
        noise = torch.empty(shape, device=device).exponential_(generator=self.generator)
        if uniform is not None:
            uniform.uniform_(generator=self.generator)
        for j, row in enumerate(rows):
            if row.generator is not None:
                if row.seed is not None:
                    row.generator.manual_seed(row.seed)
                noise[j].exponential_(generator=row.generator)
                if uniform is not None:
                    uniform[j : j + 1].uniform_(generator=row.generator)
        return noise

    def _choose(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
        chosen = argmax_rows(logits) if logits.is_cuda else logits.argmax(dim=-1)
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            idx = device_tensor(sampled, torch.long, logits.device)
            probs = sampling_probs(logits[idx], [rows[i].params for i in sampled])
            noise = self.exponential_noise(probs.shape, [rows[i] for i in sampled],
                                           logits.device)
            chosen[idx] = (probs / noise).argmax(dim=-1)
        return chosen.tolist()


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution a non-greedy row draws from: softmax of the (processed) logits over
    temperature after top-k, top-p and min-p. `argmax(probs / E)` with E ~ Exp(1) is an
    exact draw from it."""
    device = logits.device
    temperature = device_tensor([p.temperature for p in params], torch.float32, device)
    filtered = apply_top_k_top_p_min_p(
        logits / temperature.unsqueeze(-1),
        top_k=device_tensor([p.top_k for p in params], torch.long, device),
        top_p=device_tensor([p.top_p for p in params], torch.float32, device),
        min_p=device_tensor([p.min_p for p in params], torch.float32, device),
    )
    return torch.softmax(filtered, dim=-1)


def logprobs_of(raw_logprobs: torch.Tensor | None, row_index: int, token_id: int,
                row: SamplingRow) -> dict[str, Any] | None:
    """A row's logprob entry for `token_id` (None unless the row asks for logprobs)."""
    if raw_logprobs is None or row.params.logprobs is None:
        return None
    return _logprobs_of(raw_logprobs[row_index], token_id, row.params.logprobs)


def _logprobs_of(row_logprobs: torch.Tensor, token_id: int, top_n: int) -> dict[str, Any]:
    top = []
    if top_n > 0:
        values, ids = row_logprobs.topk(top_n)
        top = [[int(t), float(v)] for t, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return {"token_id": token_id, "logprob": float(row_logprobs[token_id]), "top": top}
