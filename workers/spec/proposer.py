"""The proposer interface: what every speculative method (n-gram, draft model, Medusa heads)
gives the engine.

Called once per engine step, before scheduling, for the running sequences that decode next
(their last token has no KV yet). Invariants the engine keeps: each sequence's block table
already covers `num_tokens + k` slots (the verification run's), so a proposer with its own
paged KV (the draft model) may write its KV at positions up to num_tokens + k - 2 through the
same table; a sequence's tokens only change by verification (drafts accepted, one token
added) or by preemption (`num_preemptions` grows, its blocks are gone).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from workers.engine.sequence import Sequence


@dataclass
class DraftRun:
    """One sequence's drafts: `token_ids` (k of them) and, for a sampling proposer, the
    probabilities it drew them from ([k, vocab]); None: a deterministic proposal. `parents`:
    a tree of candidates (workers/spec/tree.py), greedy requests only; None: a chain."""

    token_ids: list[int]
    probs: torch.Tensor | None = None
    parents: list[int] | None = None


class Proposer(ABC):
    name: str
    uses_hidden = False
    """True: `observe` wants the target's final hidden state of each newest token."""

    @abstractmethod
    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[DraftRun]:
        """At most max_tokens[i] (>= 1) drafts continuing seqs[i]'s tokens; fewer (or none)
        where the proposer has nothing good to offer."""

    def max_drafts(self, k: int) -> int:
        """Most drafts (verification slots) a proposal of depth k may hold: k for a chain,
        the tree's size for a tree."""
        return k

    def follow_prefill(self, seqs: list[Sequence]) -> None:  # noqa: B027 (draft model only)
        """After `propose`, once per step: seqs are running sequences in the middle of a
        chunked prefill; a proposer with its own KV may catch up on their computed tokens."""

    def forget(self, seq_id: str) -> None:  # noqa: B027 (stateless proposers keep nothing)
        """The sequence finished or was aborted: drop any state kept for it."""

    def observe(  # noqa: B027 (only Medusa reads them)
        self, seqs: list[Sequence], num_tokens: list[int], hidden: torch.Tensor
    ) -> None:
        """After a step: hidden[i] is the target's final hidden state of the row that
        produced seqs[i]'s newest token; num_tokens[i] its token count after the step."""
