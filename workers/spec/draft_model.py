"""Draft-model proposer: a second, smaller checkpoint with the target's tokenizer and vocab.

The draft runs in the same worker as the target, with its own ModelRunner and its own paged
KV cache of exactly the target pool's block count, indexed by the target's block tables: no
second block pool, and a block the target frees is the draft's to reuse too. Per sequence the
draft remembers how many of its tokens have draft KV (`computed`) and the drafts it wrote KV
for beyond them; after verification the accepted ones count as computed, the rest are
overwritten.

The draft's prefill follows the target's chunked prefill: each step, before scheduling, the
draft runs over the prompt tokens the target computed in the previous step
(`follow_prefill`), so it is one chunk behind and catches up in the sequence's first
proposal. A sequence with more tokens missing than one step's budget (on a decode worker
under disaggregation: the whole prompt, which arrived with the target's KV only) is prefilled
by the draft in chunks, one per step, and drafts nothing until it has caught up. Every draft
forward holds at most the target's step budget (max_num_batched_tokens) of tokens, so a long
prompt neither stalls the other sequences' steps nor needs a prompt-sized activation buffer.
The decode worker prefills the draft itself, so no draft KV crosses the wire and the prefill
worker needs no draft (see the module doc of workers/spec/factory.py).

A proposal of k tokens is k draft forwards: the first over the tokens the draft has not seen
(usually 1-2), then one token per sequence. Greedy requests take the draft's argmax; sampling
requests draw from the draft's distribution q (temperature, top-k/top-p/min-p as the target),
and q goes to the rejection sampler.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from workers.config import EngineConfig, SpeculativeConfig
from workers.device_copy import device_tensor
from workers.engine.model_runner import ModelRunner
from workers.engine.sampler import position_seed, sampling_probs
from workers.engine.sequence import Sequence
from workers.engine.step_input import StepInput
from workers.errors import InvalidParameter
from workers.model.config import ModelConfig
from workers.spec.proposer import DraftRun, Proposer
from workers.text.tokenizer import Tokenizer

_DRAFT_SEED_SALT = 0x5EC0DE
"""A seeded request's draft draws use position_seed(seed ^ salt, position): a stream apart
from the target's."""
_TOKENIZER_PROBE = "The quick brown fox, 42 caf\u00e9s; \u4f60\u597d! def f(x): return [x]\n"


@dataclass
class _DraftState:
    num_preemptions: int
    computed: int = 0
    pending: list[int] = field(default_factory=list)
    """Tokens at positions computed.. whose draft KV was written (drafts not yet verified)."""


def draft_engine_config(config: EngineConfig, num_blocks: int, max_model_len: int
                        ) -> EngineConfig:
    """The draft runner's config: the target's, with the draft checkpoint, the target pool's
    block count and context limit, and no speculation of its own."""
    return dataclasses.replace(
        config,
        model=config.speculative.draft_model,
        max_model_len=max_model_len,
        cache=dataclasses.replace(config.cache, num_blocks=num_blocks, kv_cache_memory=None),
        speculative=SpeculativeConfig(),
    )


def check_draft_fits(target: ModelConfig, draft: ModelConfig,
                     target_tokenizer: Tokenizer | None, draft_tokenizer: Tokenizer | None
                     ) -> None:
    """Same vocabulary and tokenizer as the target, else InvalidParameter('draft_model')."""
    if draft.vocab_size != target.vocab_size:
        raise InvalidParameter(
            "draft_model", f"the draft's vocab_size {draft.vocab_size} differs from the "
                           f"target's {target.vocab_size}")
    if (target_tokenizer is None) != (draft_tokenizer is None):
        raise InvalidParameter("draft_model", "one of draft and target has a tokenizer, the "
                                              "other none")
    if target_tokenizer is not None and draft_tokenizer is not None:
        same = (target_tokenizer.encode(_TOKENIZER_PROBE)
                == draft_tokenizer.encode(_TOKENIZER_PROBE)
                and target_tokenizer.eos_token_ids == draft_tokenizer.eos_token_ids
                and target_tokenizer.vocab_size == draft_tokenizer.vocab_size)
        if not same:
            raise InvalidParameter("draft_model", "the draft's tokenizer differs from the "
                                                  "target's (ids of a probe text or EOS ids)")


def draft_bytes(draft: ModelConfig, num_blocks: int, block_size: int, itemsize: int) -> int:
    """What the draft needs on its device: weights (dense Llama shapes) plus a KV cache of
    the target pool's block count."""
    h, layers = draft.hidden_size, draft.num_layers
    per_layer = h * (draft.q_size + 2 * draft.kv_size) + draft.q_size * h \
        + 3 * h * draft.intermediate_size
    embeddings = draft.vocab_size * h * (1 if draft.tie_word_embeddings else 2)
    kv = 2 * layers * num_blocks * block_size * draft.kv_size
    return (layers * per_layer + embeddings + kv) * itemsize


def check_draft_memory(draft: ModelConfig, target: ModelRunner) -> None:
    """On CUDA, fail at start-up (naming the field) rather than out of memory while loading
    when the target's KV cache left no room for the draft."""
    if target.device.type != "cuda":
        return
    needed = draft_bytes(draft, target.num_blocks, target.block_size, target.dtype.itemsize)
    free, _ = torch.cuda.mem_get_info(target.device)
    if needed > free:
        raise InvalidParameter(
            "draft_model", f"the draft needs ~{needed / 2**30:.1f} GiB (weights and a KV "
                           f"cache of {target.num_blocks} blocks) but {free / 2**30:.1f} GiB "
                           "are free after the target's KV cache: set --kv-cache-memory "
                           "(or a lower gpu_memory_utilization) to leave room for it")


class DraftModelProposer(Proposer):
    name = "draft"

    def __init__(self, config: EngineConfig, target: ModelRunner,
                 target_tokenizer: Tokenizer | None, draft_tokenizer: Tokenizer | None):
        path = config.speculative.draft_model
        try:  # checked before the draft's weights load
            draft_config = ModelConfig.from_path(path)
            check_draft_fits(target.model_config, draft_config, target_tokenizer,
                             draft_tokenizer)
            check_draft_memory(draft_config, target)
            self.runner = ModelRunner(
                draft_engine_config(config, target.num_blocks, target.max_model_len))
        except InvalidParameter as exc:
            raise InvalidParameter("draft_model", f"{path}: {exc.message}") from None
        self.block_size = target.block_size
        self.generator = torch.Generator(device=self.runner.device).manual_seed(config.seed + 1)
        self._row_generator = torch.Generator(device=self.runner.device)
        self._states: dict[str, _DraftState] = {}
        self.step_budget = config.scheduler.max_num_batched_tokens
        """Most tokens in one draft forward (the target's step budget): the draft's prefill
        of a long prompt is chunked to it."""
        self._budget_left = self.step_budget

    def forget(self, seq_id: str) -> None:
        self._states.pop(seq_id, None)

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[DraftRun]:
        spans, drafting = self._catch_up(seqs)
        runs = [DraftRun([]) for _ in seqs]
        if not spans:
            return runs
        logits = self.runner.execute(self._step(spans))
        rows = [row for row, (seq, start, tokens) in enumerate(spans)
                if start + len(tokens) == seq.num_tokens]
        drafted = self._draft([seqs[i] for i in drafting], [max_tokens[i] for i in drafting],
                              logits[rows] if len(rows) < len(spans) else logits)
        for i, run in zip(drafting, drafted, strict=True):
            runs[i] = run
        return runs

    def follow_prefill(self, seqs: list[Sequence]) -> None:
        """Runs the draft over the prompt tokens the target has computed (its chunked prefill,
        one step behind), in what is left of this step's draft budget."""
        budget, self._budget_left = self._budget_left, self.step_budget
        spans = []
        for seq in seqs:
            start = self._first_uncomputed(seq)
            take = min(seq.num_computed_tokens - start, budget)
            if take <= 0:
                continue
            spans.append((seq, start, seq.token_range(start, start + take)))
            self._states[seq.seq_id].computed += take
            budget -= take
        if spans:
            self.runner.execute(self._step(spans))

    def _catch_up(self, seqs: list[Sequence]
                  ) -> tuple[list[tuple[Sequence, int, list[int]]], list[int]]:
        """The first draft forward's spans, at most `step_budget` tokens in all: each
        sequence's tokens without draft KV, fewest first. A sequence whose whole span fits
        drafts this step (its index is returned); one that does not (a long prompt new to the
        draft, e.g. just arrived on a decode worker) gets a chunk of its draft prefill and no
        drafts, so a long prompt never stalls the others' steps."""
        starts = {seq.seq_id: self._first_uncomputed(seq) for seq in seqs}
        budget = self.step_budget
        spans, drafting = [], []
        for i in sorted(range(len(seqs)),
                        key=lambda i: seqs[i].num_tokens - starts[seqs[i].seq_id]):
            seq, start = seqs[i], starts[seqs[i].seq_id]
            take = min(seq.num_tokens - start, budget)
            if take == 0:
                continue
            spans.append((seq, start, seq.token_range(start, start + take)))
            budget -= take
            if start + take == seq.num_tokens:
                drafting.append(i)
            else:
                self._states[seq.seq_id].computed += take
        self._budget_left = budget
        return spans, drafting

    def _draft(self, seqs: list[Sequence], max_tokens: list[int], logits: torch.Tensor
               ) -> list[DraftRun]:
        """k draft forwards for sequences whose draft KV is complete: `logits` (the first
        forward's, one row each) gives the first draft, each further forward one more."""
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for j in range(max(max_tokens, default=0)):
            if j > 0:
                spans = [(seqs[i], seqs[i].num_tokens + j - 1, [drafts[i][-1]])
                         for i in active]
                logits = self.runner.execute(self._step(spans))
            for i, (token, q) in zip(active, self._draw(seqs, active, drafts, logits),
                                     strict=True):
                drafts[i].append(token)
                if q is not None:
                    probs[i].append(q)
            active = [i for i in active if max_tokens[i] > j + 1]
            if not active:
                break
        for seq, k, tokens in zip(seqs, max_tokens, drafts, strict=True):
            state = self._states[seq.seq_id]
            state.computed, state.pending = seq.num_tokens, tokens[: k - 1]
        return [DraftRun(tokens, torch.stack(q) if q else None)
                for tokens, q in zip(drafts, probs, strict=True)]

    def _first_uncomputed(self, seq: Sequence) -> int:
        """First position without valid draft KV: the pending drafts that verification
        accepted count now; a preempted sequence starts over."""
        state = self._states.get(seq.seq_id)
        if state is None or state.num_preemptions != seq.num_preemptions:
            state = self._states[seq.seq_id] = _DraftState(seq.num_preemptions)
        end = min(state.computed + len(state.pending), seq.num_tokens)
        actual = seq.token_range(state.computed, end)
        matched = 0
        while matched < len(actual) and actual[matched] == state.pending[matched]:
            matched += 1
        state.computed += matched
        state.pending = []
        return min(state.computed, seq.num_tokens - 1)

    def _step(self, spans: list[tuple[Sequence, int, list[int]]]) -> StepInput:
        """One draft forward: each sequence's `tokens` from position `start`, logits of its
        last."""
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        for seq, start, tokens in spans:
            table = seq.block_table
            token_ids += tokens
            for pos in range(start, start + len(tokens)):
                positions.append(pos)
                slots.append(table[pos // self.block_size] * self.block_size
                             + pos % self.block_size)
            starts.append(len(token_ids))
            seq_lens.append(start + len(tokens))
        return StepInput(
            seq_ids=[seq.seq_id for seq, _, _ in spans], token_ids=token_ids,
            positions=positions, slot_mapping=slots, query_start_loc=starts,
            seq_lens=seq_lens, block_tables=[list(seq.block_table) for seq, _, _ in spans],
            logits_indices=[end - 1 for end in starts[1:]],
        )

    def _draw(self, seqs: list[Sequence], active: list[int], drafts: list[list[int]],
              logits: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        """The next draft of each active sequence: argmax for greedy requests, a draw from
        q (returned with it) for sampling ones."""
        chosen = logits.argmax(dim=-1)
        sampled = [j for j, i in enumerate(active) if not seqs[i].params.greedy]
        q_rows: dict[int, torch.Tensor] = {}
        if sampled:
            idx = device_tensor(sampled, torch.long, logits.device)
            q = sampling_probs(logits[idx], [seqs[active[j]].params for j in sampled])
            noise = torch.empty_like(q).exponential_(generator=self.generator)
            for row, j in enumerate(sampled):
                seq = seqs[active[j]]
                if seq.params.seed is not None:
                    position = seq.num_output_tokens + len(drafts[active[j]])
                    self._row_generator.manual_seed(
                        position_seed(seq.params.seed ^ _DRAFT_SEED_SALT, position))
                    noise[row].exponential_(generator=self._row_generator)
                q_rows[j] = q[row]
            chosen[idx] = (q / noise).argmax(dim=-1)
        return [(token, q_rows.get(j)) for j, token in enumerate(chosen.tolist())]
