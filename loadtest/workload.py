"""Workloads: what each request asks for (prompt text, its estimated length, max_tokens).

Request i is a pure function of (seed, i), so a run is reproducible whatever the arrival
order, the concurrency or the number of requests. Kinds:
- `fixed`: every prompt ~input_len tokens, every output output_len tokens.
- `uniform`: lengths drawn uniformly from LO:HI ranges.
- `file`: prompts from a JSONL file ({"prompt": ...} or {"messages": [...]}, optional
  "max_tokens"), cycled in file order.
- `trace`: lengths from a trace file's rows (loadtest/trace.py).
`shared_prefix_len` puts the same ~N-token prefix in front of every synthetic prompt (the
prefix-cache workload); the rest of the prompt is unique to the request.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loadtest.errors import BadFlag, BadInputFile
from loadtest.synthetic_text import estimate_tokens, synthesize
from loadtest.trace import TraceEntry

WorkloadKind = Literal["fixed", "uniform", "file", "trace"]
WORKLOAD_KINDS: tuple[str, ...] = ("fixed", "uniform", "file", "trace")


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

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise BadFlag("--workload", self.kind, f"must be one of {', '.join(WORKLOAD_KINDS)}")
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
    prompt: str | list[dict[str, Any]]
    """Text for /v1/completions; text or a message list for /v1/chat/completions."""
    prompt_tokens_estimate: int
    max_tokens: int


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
        self._prefix = synthesize(prefix_rng, config.shared_prefix_len)
        self.size: int | None = len(self._trace) if config.kind == "trace" else None

    def spec(self, index: int) -> RequestSpec:
        rng = random.Random(f"{self.config.seed}:{index}")
        if self.config.kind == "file":
            prompt, max_tokens = self._prompts[index % len(self._prompts)]
            text = prompt if isinstance(prompt, str) else " ".join(
                str(m.get("content", "")) for m in prompt)
            out = int(max_tokens) if max_tokens else self.config.output_len.draw(rng)
            return RequestSpec(index, prompt, estimate_tokens(text), out)
        if self.config.kind == "trace":
            entry = self._trace[index]
            input_len, out = entry.input_len, entry.output_len
        else:
            input_len = self.config.input_len.draw(rng)
            out = self.config.output_len.draw(rng)
        return self._synthetic(rng, index, input_len, out)

    def _synthetic(self, rng: random.Random, index: int, input_len: int, out: int) -> RequestSpec:
        unique_len = max(input_len - self.config.shared_prefix_len, 0)
        unique = synthesize(rng, unique_len)
        prompt = f"{self._prefix} {unique}".strip() if self._prefix else unique
        prefix_len = self.config.shared_prefix_len
        return RequestSpec(index, prompt, prefix_len + unique_len, out)
