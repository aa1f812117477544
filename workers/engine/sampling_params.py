"""How one request samples and when it stops (OpenAI / vLLM names and meanings).

Frozen and validated at construction: a bad value raises `InvalidParameter` naming the
field, so the gateway can answer 400 before anything is scheduled. `to_dict`/`from_dict`
carry it on the wire (`GenerateRequest.sampling`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from workers.config import MAX_SPECULATIVE_TOKENS
from workers.errors import InvalidParameter

_MAX_LOGPROBS = 20
_INT64 = (-(2**63), 2**63 - 1)
# torch.Generator.manual_seed's range: a signed or an unsigned 64-bit value.
SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    """0 means greedy."""
    top_k: int = 0
    """0 (or -1) keeps every token."""
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    """> 1 discourages tokens seen in prompt or output (divides positive logits)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    """Per-request generator: the same seed gives the same tokens whatever the batch."""
    stop: tuple[str, ...] = ()
    """Stop strings; the text ends right before the first one (not included)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop tokens; the token is kept in token_ids, as for EOS."""
    ignore_eos: bool = False
    min_tokens: int = 0
    """EOS and stop tokens are suppressed until this many tokens are out."""
    logprobs: int | None = None
    """If set, each token's logprob plus the top-n alternatives."""
    skip_special_tokens: bool = True
    num_speculative_tokens: int | None = None
    """Speculative decoding: drafts per step for this request (0: none); None: the server's
    --num-speculative-tokens. Ignored where the server does not speculate."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Unknown wire fields, kept so newer gateways can talk to older workers."""

    def __post_init__(self) -> None:
        # Lists from JSON/msgpack become tuples so the params stay hashable-ish and frozen.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        for name in _FLOATS:
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool)
                   and math.isfinite(value), name, f"must be a finite number, got {value!r}")
        _check_int(self.max_tokens, "max_tokens", 1, _INT64[1])
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check_int(self.top_k, "top_k", 0, _INT64[1])
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(
            self.repetition_penalty > 0,
            "repetition_penalty",
            f"must be > 0, got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2 <= value <= 2, name, f"must be in [-2, 2], got {value}")
        if self.seed is not None:
            _check_int(self.seed, "seed", *SEED_RANGE)
        _check_int(self.min_tokens, "min_tokens", 0, _INT64[1])
        _check(
            self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
        )
        if self.logprobs is not None:
            _check_int(self.logprobs, "logprobs", 0, _MAX_LOGPROBS)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "needs non-empty strings")
        for token_id in self.stop_token_ids:
            _check_int(token_id, "stop_token_ids", 0, _INT64[1])
        if self.num_speculative_tokens is not None:
            _check_int(self.num_speculative_tokens, "num_speculative_tokens", 0,
                       MAX_SPECULATIVE_TOKENS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists, not tuples), for msgpack/JSON."""
        out = dataclasses.asdict(self)
        extra = out.pop("extra")
        out["stop"] = list(self.stop)
        out["stop_token_ids"] = list(self.stop_token_ids)
        return {**extra, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Inverse of `to_dict`; unknown keys go to `extra`, bad values raise."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)


_FLOATS = [f.name for f in dataclasses.fields(SamplingParams) if f.type == "float"]


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InvalidParameter(field_name, message)


def _check_int(value: object, field_name: str, low: int, high: int) -> None:
    """An integer (never a bool) in [low, high]."""
    _check(isinstance(value, int) and not isinstance(value, bool), field_name,
           f"must be an integer, got {value!r}")
    _check(low <= value <= high, field_name, f"must be in [{low}, {high}], got {value}")
