"""Prompt lookup (n-gram) proposer: no extra model.

The longest suffix of the context (prompt + output) of ngram_max down to ngram_min tokens that
also occurs earlier in the context proposes the tokens that followed its latest earlier
occurrence. Strong where the output repeats the input (code editing, extraction, RAG).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from workers.engine.sequence import Sequence
from workers.spec.proposer import DraftRun, Proposer


def ngram_lookup(tokens: list[int], k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """Up to k tokens following the latest earlier match of the longest suffix n-gram
    (numpy: a Python scan of a few thousand tokens per sequence per step costs a decode
    step's time)."""
    total = len(tokens)
    array = np.asarray(tokens)
    for n in range(min(ngram_max, total - 1), ngram_min - 1, -1):
        # Windows that start early enough to be followed by at least one token.
        windows = sliding_window_view(array, n)[: total - n]
        hits = np.flatnonzero((windows == array[total - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # latest match: recent context predicts best
            return tokens[start : start + k]
    return []


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[DraftRun]:
        return [
            DraftRun(ngram_lookup(seq.prompt_token_ids + seq.output_token_ids, k,
                                  self.ngram_min, self.ngram_max))
            for seq, k in zip(seqs, max_tokens, strict=True)
        ]
