"""Synthetic prompt text of about N tokens, built from common English words.

Each word is short, lower-case and frequent, so byte-level BPE tokenizers (GPT-2, Llama-3,
Qwen) encode " word" as one token; a prompt of N words is then about N tokens. The client
never knows the server's tokenizer, so this count is an estimate and the server's
`usage.prompt_tokens` is reported as the truth wherever the server sends it.
"""

from __future__ import annotations

import random

WORDS = (
    "the of and to in is was for on are with as his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about "
    "how up out them then she many some so these would other into has more her two like him "
    "see time could no make than first been its who now people my made over did down only way "
    "find use may water long little very after words called just where most know get through "
    "back much go good new write our me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take "
    "why things help put years different away again off went old number great tell men say "
    "small every found still between name should home big give air line set own under read "
    "last never us left end along while might next sound below saw something thought both few "
    "those always looked show large often together asked house world going want school "
    "important until form food keep children feet land side without boy once animals life "
    "enough took sometimes four head above kind began almost live page got earth need far hand "
    "high year mother light parts country father let night following picture being study "
    "second eyes soon times story boys since white days ever paper hard near sentence better "
    "best across during today others however sure means knew try told young miles sun ways "
    "thing whole hear example heard several change answer room sea against top turned learn "
    "point city play toward five using himself usually"
).split()


def synthesize(rng: random.Random, num_words: int) -> str:
    """`num_words` words drawn uniformly from WORDS with `rng` (same rng state, same text)."""
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def estimate_tokens(text: str) -> int:
    """Rough token count of arbitrary text: whitespace words, at least 1 for non-empty text."""
    return max(1, len(text.split())) if text else 0
