"""Synthetic token-id prompts: exactly N ids, for servers without a tokenizer (random weights).

`/v1/completions` takes `"prompt": [ids...]` (OpenAI's token-array form, which vLLM, SGLang
and kvrelay accept), so the prompt length is known exactly instead of estimated. Ids are drawn
uniformly from [first_id(vocab_size), vocab_size): every id is inside the model's vocabulary,
and the lowest ids, where most vocabularies keep their special and control tokens (padding,
BOS/EOS, unknown), are skipped.
"""

from __future__ import annotations

import random

DEFAULT_VOCAB_SIZE = 1000
"""Ids then lie in [100, 1000): inside any real model's vocabulary, none of the special ones
that sit at the top of Llama-3's (128000+) or GPT-2's (50256)."""
_SKIPPED_LOW_IDS = 100


def first_id(vocab_size: int) -> int:
    """The lowest id drawn: 100, or half the vocabulary when it is smaller than 200 ids."""
    return min(_SKIPPED_LOW_IDS, vocab_size // 2)


def synthesize_ids(rng: random.Random, num_tokens: int, vocab_size: int) -> list[int]:
    """`num_tokens` ids drawn with `rng` (same rng state, same ids)."""
    return rng.choices(range(first_id(vocab_size), vocab_size), k=num_tokens)
