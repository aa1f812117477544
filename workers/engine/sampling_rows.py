"""`SamplingRows`: the sampler's row for each sequence, with its per-position seed.

A seeded request owns a generator that is re-seeded for every token it draws from
(seed, output position) (`sampler.position_seed`), so a continuation on another worker, or a
verification run that accepts a draft, draws what a plain decode of that position would have.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from workers.engine.sampler import SamplingRow, position_seed
from workers.engine.sequence import Sequence
from workers.engine.stop_checker import StopChecker


class SamplingRows:
    def __init__(self, device: torch.device, stop_checker: StopChecker):
        self.device = device
        self.stop_checker = stop_checker
        self._generators: dict[str, torch.Generator] = {}

    def admit(self, seq: Sequence) -> None:
        if seq.params.seed is not None:
            self._generators[seq.seq_id] = torch.Generator(device=self.device)

    def forget(self, seq_id: str) -> None:
        self._generators.pop(seq_id, None)

    def row(self, seq: Sequence, drafts: Seq[int] = ()) -> SamplingRow:
        """The row that samples seq's next output token, or the one after `drafts` (a
        verification run's row), with that position's seed and min_tokens ban."""
        position = seq.num_output_tokens + len(drafts)
        generator = self._generators.get(seq.seq_id)
        banned = self.stop_checker.banned_token_ids(seq) \
            if position < seq.params.min_tokens else ()
        return SamplingRow(
            params=seq.params,
            prompt_token_ids=seq.prompt_token_ids,
            # Only penalties read the output; a copy per row costs O(output) per draft.
            output_token_ids=seq.output_token_ids + list(drafts)
            if drafts and seq.params.has_penalties else seq.output_token_ids,
            generator=generator,
            seed=position_seed(seq.params.seed, position) if generator is not None else None,
            banned_token_ids=banned,
        )
