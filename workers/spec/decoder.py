"""`SpeculativeDecoder`: the engine's speculative hooks, around one proposer.

Per engine step (workers/engine/engine.py):
1. `propose(running)` before scheduling: for each running sequence that decodes next, k =
   its request's num_speculative_tokens (default: the server's K), clipped to the context
   limit, to what max_tokens still allows and to the free blocks; the table grows to the
   verification run's num_tokens + k slots and the proposer fills `seq.spec_token_ids`
   (slots it did not use are rolled back at once). Sequences in the middle of a chunked
   prefill go to `proposer.follow_prefill`, so a draft model prefills along with the target.
2. The scheduler runs 1 + k tokens for such a sequence and returns logits for all of them.
3. `verify(...)` (workers/spec/rejection.py) keeps a prefix of the drafts plus one token;
   the scheduler's postprocess rolls the rejected slots back.
Counters: drafted and accepted tokens and verification steps, per request (the final chunk's
timings) and in total (the worker's metrics), with vLLM's names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from workers.engine.block_pool import BlockPool
from workers.engine.sampler import Sampler, SamplingRow
from workers.engine.sequence import Sequence, SequenceStatus
from workers.errors import InvalidParameter
from workers.spec.proposer import DraftRun, Proposer
from workers.spec.rejection import VerifyResult, verify


@dataclass
class SpecStats:
    """vLLM's spec_decode counters: draft tokens proposed and verified, those accepted, and
    verification runs (one per sequence per step)."""

    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_drafts: int = 0

    def add(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        self.num_drafts += 1

    def to_dict(self) -> dict[str, float]:
        """The counters plus acceptance rate (accepted / drafted) and mean accepted length
        (tokens emitted per verification run: accepted + 1)."""
        out: dict[str, float] = {
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            "spec_decode_num_drafts": self.num_drafts,
        }
        if self.num_draft_tokens:
            out["spec_decode_acceptance_rate"] = self.num_accepted_tokens / self.num_draft_tokens
        if self.num_drafts:
            out["spec_decode_mean_accepted_length"] = 1 + self.num_accepted_tokens / self.num_drafts
        return out


def check_speculative_config(config: SpeculativeConfig) -> None:
    """Start-up checks that need no model; raises InvalidParameter naming the field."""
    if config.method is None:
        return
    if config.method not in ("ngram", "draft", "medusa"):
        raise InvalidParameter("speculative", f"{config.method!r} is not ngram, draft or medusa")
    k = config.num_speculative_tokens
    if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise InvalidParameter(
            "num_speculative_tokens",
            f"must be in [1, {MAX_SPECULATIVE_TOKENS}] with --speculative {config.method} "
            f"(the verify kernel takes at most {MAX_SPECULATIVE_TOKENS + 1} query tokens), "
            f"got {k}")
    if config.method in ("draft", "medusa") and not config.draft_model:
        raise InvalidParameter("draft_model", f"--speculative {config.method} needs "
                                              "--draft-model DIR")
    if config.method == "ngram" and not 1 <= config.ngram_min <= config.ngram_max:
        raise InvalidParameter("ngram_min", f"need 1 <= ngram_min ({config.ngram_min}) <= "
                                            f"ngram_max ({config.ngram_max})")


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, pool: BlockPool,
                 max_model_len: int, pad_to_k: bool = False):
        """`pad_to_k`: the target replays verification steps of exactly 1 + K tokens per
        sequence from CUDA graphs, so where any sequence of the step has drafts, a shorter
        proposal is padded to K by repeating its last token (a valid deterministic draft:
        verified like any other, rarely accepted)."""
        self.config = config
        self.pad_to_k = pad_to_k
        self.proposer = proposer
        self.pool = pool
        self.max_model_len = max_model_len
        self.totals = SpecStats()
        self._per_request: dict[str, SpecStats] = {}
        self._draft_probs: dict[str, torch.Tensor | None] = {}

    def num_tokens_for(self, seq: Sequence) -> int:
        """k for this step: the request's (or the server's) K, clipped so the run stays in
        the context and emits no more than max_tokens allows (drafts + 1 token)."""
        requested = seq.params.num_speculative_tokens
        k = self.config.num_speculative_tokens if requested is None else requested
        return max(0, min(k, self.max_model_len - seq.num_tokens,
                          seq.params.max_tokens - seq.num_output_tokens - 1))

    def propose(self, running: list[Sequence]) -> None:
        seqs, ks, prefilling = [], [], []
        for seq in running:
            seq.spec_token_ids = []
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if seq.num_uncomputed_tokens > 1:
                if seq.num_computed_tokens > 0:
                    prefilling.append(seq)
                continue
            k = self.num_tokens_for(seq)
            if k == 0 or not self.pool.can_append_slots(seq.block_table, seq.num_tokens + k):
                continue
            self.pool.append_slots(seq.block_table, seq.num_tokens + k)
            seqs.append(seq)
            ks.append(k)
        if seqs:
            self._propose(seqs, ks)
        self.proposer.follow_prefill(prefilling)

    def _propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        runs = self.proposer.propose(seqs, ks)
        # Padding keeps a batch with some drafts on the verify graph; a batch with none runs
        # as a plain decode step (padding it would pay K wasted tokens per sequence).
        pad = self.pad_to_k and any(run.token_ids for run in runs)
        for seq, k, run in zip(seqs, ks, runs, strict=True):
            if pad and len(run.token_ids) < k and run.probs is None:
                last = run.token_ids[-1] if run.token_ids else seq.output_token_ids[-1]
                run.token_ids = [*run.token_ids, *[last] * (k - len(run.token_ids))]
            seq.spec_token_ids = list(run.token_ids)
            self._draft_probs[seq.seq_id] = run.probs
            self.pool.rollback_slots(seq.block_table, seq.num_tokens + len(run.token_ids))

    def verify(self, sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence],
               rows: list[SamplingRow]) -> VerifyResult:
        """Verifies each sequence's drafts (rows: 1 + k per sequence, see rejection.py) and
        counts the result."""
        runs = []
        for seq in seqs:
            k = len(seq.spec_token_ids)  # the scheduler may have dropped drafts (budget)
            probs = self._draft_probs.pop(seq.seq_id, None)
            runs.append(DraftRun(list(seq.spec_token_ids), None if probs is None else probs[:k]))
        result = verify(sampler, logits, rows, runs)
        for seq, run, accepted in zip(seqs, runs, result.num_accepted, strict=True):
            if run.token_ids:
                self.totals.add(len(run.token_ids), accepted)
                self._per_request.setdefault(seq.seq_id, SpecStats()).add(
                    len(run.token_ids), accepted)
        return result

    def observe(self, seqs: list[Sequence], new_tokens: list[list[int]],
                hidden: torch.Tensor | None) -> None:
        """Before postprocess (drafts still set): hands the proposer the hidden row that
        produced each sequence's newest token, if it wants them."""
        if not self.proposer.uses_hidden or hidden is None:
            return
        rows, start = [], 0
        for seq, tokens in zip(seqs, new_tokens, strict=True):
            rows.append(start + len(tokens) - 1)
            start += 1 + len(seq.spec_token_ids)
        index = torch.tensor(rows, device=hidden.device)
        num_tokens = [s.num_tokens + len(t) for s, t in zip(seqs, new_tokens, strict=True)]
        self.proposer.observe(seqs, num_tokens, hidden.index_select(0, index))

    def request_stats(self, seq_id: str) -> SpecStats | None:
        return self._per_request.get(seq_id)

    def forget(self, seq_id: str) -> None:
        self._per_request.pop(seq_id, None)
        self._draft_probs.pop(seq_id, None)
        self.proposer.forget(seq_id)
