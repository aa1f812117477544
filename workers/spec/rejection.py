"""Verification of draft tokens against the target's logits (one forward for all of them).

A sequence that proposed k drafts d_1..d_k has k + 1 target rows: row i is the target's
distribution for the token after d_1..d_i. The result is the accepted prefix of the drafts
plus one token, so every verification step emits between 1 and k + 1 tokens.

- Greedy (temperature 0): d_{i+1} is accepted while it equals row i's argmax; the first
  mismatch emits that argmax instead (the bonus row's argmax if all match). The output is
  exactly what plain greedy decoding gives.
- Sampling: exact rejection sampling (Leviathan et al. 2023, Chen et al. 2023). With p the
  target's distribution (same penalties, banned tokens, temperature, top-k/top-p/min-p as the
  plain sampler) and q the proposer's, d is accepted with probability min(1, p(d) / q(d));
  a rejection draws from norm(max(p - q, 0)); all accepted draws the bonus from p. Each
  emitted token is then distributed exactly as p. A deterministic proposer (n-gram, Medusa's
  top chain) has q one-hot at its draft: accept with probability p(d), else draw from p
  without d.
- A tree of candidates (greedy only; Medusa with --medusa-tree tree): row 0 is the root's,
  row j + 1 node j's. From the root, the child whose token equals the current row's argmax
  is accepted and the walk moves to its row; the first row with no such child emits its
  argmax. That is the longest path plain greedy decoding would also take.

Rows are processed in one batch: every row gets a uniform u and a candidate token
(argmax(r / E), E ~ Exp(1), r the residual, or p itself on the bonus row); the host then
walks each sequence's rows once. A seeded row draws E then u from its own generator, seeded
for its output position, so a run with no drafts draws exactly what the plain sampler would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.device_copy import device_tensor
from workers.engine.sampler import Sampler, SamplingRow, logprobs_of, sampling_probs
from workers.spec.proposer import DraftRun


@dataclass
class VerifyResult:
    token_ids: list[list[int]]
    """Per sequence: the accepted drafts plus one token."""
    logprobs: list[list[dict | None]]
    """Per sequence, per emitted token (entries None unless the request asks)."""
    num_accepted: list[int]
    """Per sequence: how many of its drafts were accepted."""
    rows: list[list[int]]
    """Per sequence, per emitted token: the row (within its run) whose logits produced it;
    a chain's are 0, 1, ..; a tree's follow the accepted path."""


def verify(
    sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], runs: list[DraftRun]
) -> VerifyResult:
    """`logits` [sum(k + 1), vocab]: each run's k + 1 rows in order; `rows` the sampling
    rows for them (row i of a run: its sequence with d_1..d_i appended to the output)."""
    assert logits.shape[0] == len(rows) == sum(len(r.token_ids) + 1 for r in runs)
    raw_logprobs = sampler.raw_logprobs(logits, rows)
    processed = sampler.processed_logits(logits, rows)
    chosen = processed.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    draft_of_row, starts = _draft_per_row(runs, logits.device)
    accept_p = torch.ones(logits.shape[0], device=logits.device)
    if sampled:
        idx = device_tensor(sampled, torch.long, logits.device)
        probs = sampling_probs(processed[idx], [rows[i].params for i in sampled])
        draft_probs = _draft_probs(runs, probs.shape[-1], logits.device)[idx]
        drafts = draft_of_row[idx]
        has_draft = drafts >= 0
        safe = drafts.clamp(min=0).unsqueeze(-1)
        p_d = probs.gather(-1, safe).squeeze(-1)
        q_d = draft_probs.gather(-1, safe).squeeze(-1).clamp(min=1e-30)
        residual = torch.where(has_draft.unsqueeze(-1), (probs - draft_probs).clamp(min=0), probs)
        # A draft row whose residual is all zero (p == q) never rejects; keep argmax defined.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, probs)
        noise, uniform = _row_randomness(sampler, [rows[i] for i in sampled], probs.shape)
        chosen[idx] = (residual / noise).argmax(dim=-1)
        accept_p[idx] = torch.where(has_draft, (p_d / q_d).clamp(max=1.0) - uniform, 1.0)
    chosen_host = chosen.tolist()
    accepts = (accept_p > 0).tolist()  # sampled: u < p/q; greedy rows are checked below
    tokens, logprobs, num_accepted, used_rows = [], [], [], []
    for run, start in zip(runs, starts, strict=True):
        if run.parents is None:
            out = _accept_chain(run, start, rows, chosen_host, accepts)
            path = list(range(len(out) + 1))
        else:
            path = _accept_tree(run, start, rows, chosen_host)
            out = [run.token_ids[row - 1] for row in path[1:]]
        num_accepted.append(len(out))
        out.append(chosen_host[start + path[-1]])
        tokens.append(out)
        used_rows.append(path)
        logprobs.append([logprobs_of(raw_logprobs, start + row, t, rows[start + row])
                         for row, t in zip(path, out, strict=True)])
    return VerifyResult(tokens, logprobs, num_accepted, used_rows)


def _accept_chain(run: DraftRun, start: int, rows: list[SamplingRow], chosen: list[int],
                  accepts: list[bool]) -> list[int]:
    """The accepted prefix of a chain's drafts."""
    out: list[int] = []
    for i, draft in enumerate(run.token_ids):
        row = start + i
        greedy = rows[row].params.greedy
        if (greedy and chosen[row] != draft) or (not greedy and not accepts[row]):
            break
        out.append(draft)
    return out


def _accept_tree(run: DraftRun, start: int, rows: list[SamplingRow], chosen: list[int]
                 ) -> list[int]:
    """Rows of the accepted path from the root (row 0), greedy."""
    assert run.parents is not None and rows[start].params.greedy, "trees are greedy only"
    path = [0]
    while True:
        target = chosen[start + path[-1]]
        child = next((j for j, (parent, token) in enumerate(
            zip(run.parents, run.token_ids, strict=True))
            if parent == path[-1] - 1 and token == target), None)
        if child is None:
            return path
        path.append(child + 1)


def _draft_per_row(runs: list[DraftRun], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """The draft each row verifies (-1 on bonus rows) and each run's first row."""
    per_row: list[int] = []
    starts = []
    for run in runs:
        starts.append(len(per_row))
        per_row += [*run.token_ids, -1]
    return device_tensor(per_row, torch.long, device), starts


def _draft_probs(runs: list[DraftRun], vocab: int, device: torch.device) -> torch.Tensor:
    """q per row ([rows, vocab]): the proposer's, one-hot for a deterministic one, zero on
    bonus rows."""
    parts = []
    for run in runs:
        k = len(run.token_ids)
        if run.probs is not None:
            q = run.probs.to(device=device, dtype=torch.float32)
        else:
            q = torch.zeros(k, vocab, device=device).scatter_(
                1, device_tensor(run.token_ids, torch.long, device).unsqueeze(1), 1.0)
        parts += [q, torch.zeros(1, vocab, device=device)]
    return torch.cat(parts)


def _row_randomness(sampler: Sampler, rows: list[SamplingRow],
                    shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """E ~ Exp(1) [rows, vocab] and u ~ U[0, 1) [rows] (a seeded row's E first, as the
    plain sampler draws it)."""
    device = sampler.generator.device
    uniform = torch.empty(shape[0], device=device)
    noise = sampler.exponential_noise(shape, rows, device, uniform)
    return noise, uniform
