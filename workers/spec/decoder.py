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
   the scheduler's postprocess rolls the rejected slots back. A tree of candidates
   (workers/spec/tree.py) is verified the same way; its accepted path's KV is then moved
   from the nodes' slots to the slots right after the last token (`_compact`), so the
   cache holds exactly the accepted tokens' KV, as after a chain.
Counters: drafted and accepted tokens and verification steps, per request (the final chunk's
timings) and in total (the worker's metrics), with vLLM's names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from workers.device_copy import device_tensor
from workers.engine.block_pool import BlockPool
from workers.engine.sampler import Sampler, SamplingRow
from workers.engine.sequence import Sequence, SequenceStatus
from workers.errors import InvalidParameter
from workers.spec.proposer import DraftRun, Proposer
from workers.spec.rejection import VerifyResult, verify
from workers.spec.tree import path_to


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
    if config.medusa_tree not in ("chain", "tree"):
        raise InvalidParameter("medusa_tree", f"{config.medusa_tree!r} is not chain or tree")
    if config.medusa_tree == "tree" and config.method != "medusa":
        raise InvalidParameter("medusa_tree", f"a tree needs --speculative medusa, not "
                                              f"{config.method}")
    if config.medusa_tree == "tree" and not k <= config.medusa_tree_size <= \
            MAX_SPECULATIVE_TOKENS:
        raise InvalidParameter("medusa_tree_size", f"must be in [K={k}, "
                                                   f"{MAX_SPECULATIVE_TOKENS}], got "
                                                   f"{config.medusa_tree_size}")
    if config.method == "ngram" and not 1 <= config.ngram_min <= config.ngram_max:
        raise InvalidParameter("ngram_min", f"need 1 <= ngram_min ({config.ngram_min}) <= "
                                            f"ngram_max ({config.ngram_max})")


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, pool: BlockPool,
                 max_model_len: int, pad_to_k: bool = False,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """`pad_to_k`: the target replays verification steps of exactly 1 + K tokens per
        sequence from CUDA graphs, so where any sequence of the step has drafts, a shorter
        proposal is padded to K by repeating its last token (a valid deterministic draft:
        verified like any other, rarely accepted). `kv_caches`: the target's per-layer caches,
        where accepted tree paths are compacted (a proposer of trees needs them)."""
        self.config = config
        self.pad_to_k = pad_to_k
        self.proposer = proposer
        self.pool = pool
        self.max_model_len = max_model_len
        self.totals = SpecStats()
        self._per_request: dict[str, SpecStats] = {}
        self._draft_probs: dict[str, torch.Tensor | None] = {}
        self.kv_caches = kv_caches or []
        self._paths: dict[str, list[int]] = {}
        """This step's verified runs: the rows of each sequence's emitted tokens."""

    def num_tokens_for(self, seq: Sequence) -> int:
        """k for this step: the request's (or the server's) K, clipped so the run stays in
        the context and emits no more than max_tokens allows (drafts + 1 token)."""
        requested = seq.params.num_speculative_tokens
        k = self.config.num_speculative_tokens if requested is None else requested
        return max(0, min(k, self.max_model_len - seq.num_tokens,
                          seq.params.max_tokens - seq.num_output_tokens - 1))

    def propose(self, running: list[Sequence]) -> None:
        seqs, ks, prefilling = [], [], []
        self._paths = {}
        for seq in running:
            seq.spec_token_ids, seq.spec_tree = [], []
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if seq.num_uncomputed_tokens > 1:
                if seq.num_computed_tokens > 0:
                    prefilling.append(seq)
                continue
            k = self.num_tokens_for(seq)
            if k == 0:
                continue
            slots = seq.num_tokens + self.proposer.max_drafts(k)
            if not self.pool.can_append_slots(seq.block_table, slots):
                continue
            self.pool.append_slots(seq.block_table, slots)
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
            if pad and len(run.token_ids) < k and run.probs is None and run.parents is None:
                last = run.token_ids[-1] if run.token_ids else seq.output_token_ids[-1]
                run.token_ids = [*run.token_ids, *[last] * (k - len(run.token_ids))]
            seq.spec_token_ids = list(run.token_ids)
            seq.spec_tree = list(run.parents or [])
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
            runs.append(DraftRun(list(seq.spec_token_ids), None if probs is None else probs[:k],
                                 seq.spec_tree[:k] or None))
        result = verify(sampler, logits, rows, runs)
        self._paths = {seq.seq_id: path for seq, path in zip(seqs, result.rows, strict=True)}
        self._compact([(seq, path) for seq, run, path in zip(seqs, runs, result.rows,
                                                             strict=True)
                       if run.parents is not None])
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
        if not self.proposer.uses_hidden or hidden is None or not seqs:
            return
        rows, start = [], 0
        for seq, tokens in zip(seqs, new_tokens, strict=True):
            rows.append(start + self._paths.get(seq.seq_id, [len(tokens) - 1])[-1])
            start += 1 + len(seq.spec_token_ids)
        index = device_tensor(rows, torch.long, hidden.device)
        num_tokens = [s.num_tokens + len(t) for s, t in zip(seqs, new_tokens, strict=True)]
        self.proposer.observe(seqs, num_tokens, hidden.index_select(0, index))

    def draft_prefixes(self, seq: Sequence) -> list[list[int]]:
        """The drafts before each row of seq's verification run (the row's sampling context:
        penalties, min_tokens): a chain's prefixes, or each tree node's path."""
        drafts = seq.spec_token_ids
        tree = seq.spec_tree[: len(drafts)]
        if not tree:
            return [drafts[:i] for i in range(len(drafts) + 1)]
        return [[], *([drafts[j] for j in path_to(tree, node)] for node in range(len(tree)))]

    def _compact(self, runs: list[tuple[Sequence, list[int]]]) -> None:
        """Moves each tree run's accepted nodes' KV (node j sits at slot num_tokens + j) to
        the slots of their positions (num_tokens + depth - 1), in every layer."""
        src, dst = [], []
        size = self.pool.block_size
        for seq, path in runs:
            table, base = seq.block_table, seq.num_tokens
            for depth, row in enumerate(path[1:]):
                if row - 1 != depth:
                    src.append(table[(base + row - 1) // size] * size + (base + row - 1) % size)
                    dst.append(table[(base + depth) // size] * size + (base + depth) % size)
        if not src:
            return
        device = self.kv_caches[0][0].device
        src_index = device_tensor(src, torch.long, device)
        dst_index = device_tensor(dst, torch.long, device)
        for caches in self.kv_caches:
            for cache in caches:
                flat = cache.view(-1, *cache.shape[2:])
                if flat.element_size() == 1:  # fp8: move the bytes (no fp8 index_put on CPU)
                    flat = flat.view(torch.uint8)
                flat[dst_index] = flat[src_index]  # gathers first: overlapping moves are safe

    def request_stats(self, seq_id: str) -> SpecStats | None:
        return self._per_request.get(seq_id)

    def forget(self, seq_id: str) -> None:
        self._per_request.pop(seq_id, None)
        self._draft_probs.pop(seq_id, None)
        self.proposer.forget(seq_id)
