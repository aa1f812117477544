"""Workloads: what each request asks for (the prompt, its length in tokens, max_tokens).

Request i is a pure function of (seed, i), so a run is reproducible whatever the arrival
order, the concurrency or the number of requests. Kinds:
- `fixed`: every prompt ~input_len tokens, every output output_len tokens.
- `uniform`: lengths drawn uniformly from LO:HI ranges.
- `file`: prompts from a JSONL file ({"prompt": ...} or {"messages": [...]}, optional
  "max_tokens"), cycled in file order.
- `trace`: lengths from a trace file's rows (loadtest/trace.py).
`shared_prefix_len` puts the same ~N-token prefix in front of every synthetic prompt (the
prefix-cache workload); the rest of the prompt is unique to the request.
`prompt_format` says what a synthetic prompt is: `text` (English words, about one token each,
so its length is an estimate) or `token_ids` (exactly N ids below `vocab_size`, for
/v1/completions; what a server with random weights and no tokenizer can serve).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loadtest.errors import BadFlag, BadInputFile
from loadtest.synthetic_ids import DEFAULT_VOCAB_SIZE, synthesize_ids
from loadtest.synthetic_text import estimate_tokens, synthesize
from loadtest.trace import TraceEntry

WorkloadKind = Literal["fixed", "uniform", "file", "trace"]
WORKLOAD_KINDS: tuple[str, ...] = ("fixed", "uniform", "file", "trace")
PromptFormat = Literal["text", "token_ids"]
PROMPT_FORMATS: tuple[str, ...] = ("text", "token_ids")


@dataclass(frozen=True)
class LengthRange:
    low: int
    high: int

    @classmethod
    def parse(cls, text: str | int, flag: str) -> LengthRange:
        """`128` (fixed) or `64:256` (inclusive range)."""
        parts = str(text).split(":")
        try:
            low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
        except ValueError:
            raise BadFlag(flag, text, "expected N or LO:HI") from None
        if not 1 <= low <= high:
            raise BadFlag(flag, text, "expected 1 <= LO <= HI")
        return cls(low, high)

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True)
class WorkloadConfig:
    kind: WorkloadKind = "fixed"
    input_len: LengthRange = LengthRange(128, 128)
    output_len: LengthRange = LengthRange(64, 64)
    shared_prefix_len: int = 0
    prompts_file: str | None = None
    seed: int = 0
    prompt_format: PromptFormat = "text"
    vocab_size: int = DEFAULT_VOCAB_SIZE
    """token_ids: ids are drawn below this (loadtest/synthetic_ids.py)."""

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise BadFlag("--workload", self.kind, f"must be one of {', '.join(WORKLOAD_KINDS)}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise BadFlag("--prompt-format", self.prompt_format,
                          f"must be one of {', '.join(PROMPT_FORMATS)}")
        if self.prompt_format == "token_ids" and self.kind == "file":
            raise BadFlag("--prompt-format", self.prompt_format, "a prompts file brings its own "
                          "prompts (rows may hold token-id lists); drop one of the two flags")
        if self.vocab_size < 2:
            raise BadFlag("--vocab-size", self.vocab_size, "must be >= 2")
        if self.kind == "fixed" and (self.input_len.low != self.input_len.high
                                     or self.output_len.low != self.output_len.high):
            raise BadFlag("--workload", self.kind, "fixed lengths take N, not LO:HI (uniform)")
        if self.kind == "file" and not self.prompts_file:
            raise BadFlag("--workload", self.kind, "needs --prompts-file")
        if self.shared_prefix_len < 0:
            raise BadFlag("--shared-prefix-len", self.shared_prefix_len, "must be >= 0")


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: str | list[int] | list[dict[str, Any]]
    """Text or token ids for /v1/completions; text or a message list for chat."""
    prompt_tokens: int
    """Exact for token-id prompts, else an estimate (whitespace words)."""
    max_tokens: int
    prompt_tokens_exact: bool = False


def load_prompts(path: str) -> list[tuple[str | list[dict[str, Any]], int | None]]:
    """(prompt or messages, max_tokens or None) per JSONL line; raises BadInputFile."""
    prompts = []
    lines = Path(path).read_text().splitlines() if Path(path).is_file() else None
    if lines is None:
        raise BadInputFile(path, 0, "no such file")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputFile(path, number, f"not JSON: {exc.msg}") from None
        prompt = row.get("messages") or row.get("prompt") or row.get("text")
        if not prompt:
            raise BadInputFile(path, number, "needs a non-empty prompt, text or messages")
        prompts.append((prompt, row.get("max_tokens") or row.get("output_len")))
    if not prompts:
        raise BadInputFile(path, 0, "no prompts")
    return prompts


class Workload:
    """Makes RequestSpec i on demand. `size` is the number of distinct requests (None: endless)."""

    def __init__(self, config: WorkloadConfig, trace: list[TraceEntry] | None = None) -> None:
        if config.kind == "trace" and not trace:
            raise BadFlag("--workload", config.kind, "needs --trace-file")
        self.config = config
        self._trace = trace or []
        self._prompts = load_prompts(config.prompts_file) if config.kind == "file" else []
        prefix_rng = random.Random(f"{config.seed}:prefix")
        self._prefix = self._synthesize(prefix_rng, config.shared_prefix_len)
        self.size: int | None = len(self._trace) if config.kind == "trace" else None

    def spec(self, index: int) -> RequestSpec:
        rng = random.Random(f"{self.config.seed}:{index}")
        if self.config.kind == "file":
            prompt, max_tokens = self._prompts[index % len(self._prompts)]
            out = int(max_tokens) if max_tokens else self.config.output_len.draw(rng)
            if _is_token_ids(prompt):
                return RequestSpec(index, prompt, len(prompt), out, prompt_tokens_exact=True)
            text = prompt if isinstance(prompt, str) else " ".join(
                str(m.get("content", "")) for m in prompt)
            return RequestSpec(index, prompt, estimate_tokens(text), out)
        if self.config.kind == "trace":
            entry = self._trace[index]
            input_len, out = entry.input_len, entry.output_len
        else:
            input_len = self.config.input_len.draw(rng)
            out = self.config.output_len.draw(rng)
        return self._synthetic(rng, index, input_len, out)

    def _synthesize(self, rng: random.Random, num_tokens: int) -> str | list[int]:
        if self.config.prompt_format == "token_ids":
            return synthesize_ids(rng, num_tokens, self.config.vocab_size)
        return synthesize(rng, num_tokens)

    def _synthetic(self, rng: random.Random, index: int, input_len: int, out: int) -> RequestSpec:
        prefix_len = self.config.shared_prefix_len
        unique_len = max(input_len - prefix_len, 0)
        unique = self._synthesize(rng, unique_len)
        if isinstance(unique, list):  # token ids: the length is exact
            ids = self._prefix + unique
            return RequestSpec(index, ids, len(ids), out, prompt_tokens_exact=True)
        text = f"{self._prefix} {unique}".strip() if self._prefix else unique
        return RequestSpec(index, text, prefix_len + unique_len, out)


def _is_token_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt)
