"""`RequestCheck`: what an engine refuses before it queues or reserves anything.

Every check raises the typed error the gateway turns into an OpenAI-style 400 (workers/
errors.py) and changes nothing; the engine checks a request once, whether it is added,
reserved for a remote prefill, or continued after a migration.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from workers.engine.sampling_params import SamplingParams
from workers.errors import EmptyPrompt, InvalidParameter, PromptTooLong, UnknownTokenIds


class RequestCheck:
    """The limits of one engine: its vocabulary, context, scheduling policy and whether it
    has a tokenizer (stop strings and text prompts need one)."""

    def __init__(self, vocab_size: int, max_model_len: int, policy: str, has_tokenizer: bool):
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.policy = policy
        self.has_tokenizer = has_tokenizer

    def __call__(self, prompt_token_ids: list[int], params: SamplingParams, priority: int,
                 output_token_ids: Seq[int] = ()) -> None:
        if not prompt_token_ids:
            raise EmptyPrompt()
        vocab = self.vocab_size
        known = [*prompt_token_ids, *output_token_ids]
        bad = [t for t in known if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise UnknownTokenIds(bad, vocab)
        if len(known) > self.max_model_len:
            raise PromptTooLong(length=len(known), max=self.max_model_len)
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidParameter("stop_token_ids", f"token ids {bad[:8]} are outside the "
                                                     f"vocabulary of size {vocab}")
        if priority != 0 and self.policy != "priority":
            raise InvalidParameter("priority", f"got {priority}, but this server schedules "
                                               "first come first served (policy fcfs)")
        if params.stop and not self.has_tokenizer:
            raise InvalidParameter("stop", "stop strings need a tokenizer; this model has none")

    def first_token(self, token_id: int) -> None:
        """A remote prefill's first token (decode role): inside the vocabulary."""
        if not 0 <= token_id < self.vocab_size:
            raise UnknownTokenIds([token_id], self.vocab_size)
