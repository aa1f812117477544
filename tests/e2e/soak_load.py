"""A soak workload over HTTP and the RSS judge of the soak test (tests/e2e/test_soak.py).

`soak` runs concurrent clients for a while: mixed prompt and output lengths, streamed or not,
one request in ten cancelled mid-stream, and samples every server process's RSS meanwhile.
`sustained_growth` reads those samples: a process grows when the median of the last third of
its samples exceeds the median of the middle third by more than a threshold (the first third
is warm-up: allocator pools, caches, Ray's own start-up), so single spikes do not count.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


@dataclass
class SoakResult:
    ok: int = 0
    cancelled: int = 0
    errors: list[str] = field(default_factory=list)
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    """(seconds since start, RSS bytes per process)."""


async def _one_request(client: httpx.AsyncClient, rng: random.Random, vocab: int,
                       max_prompt: int, result: SoakResult) -> None:
    prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(4, max_prompt))]
    body = {"model": "tiny", "prompt": prompt, "max_tokens": rng.randint(1, 48),
            "temperature": rng.choice([0, 0.8]), "ignore_eos": True,
            "stream": rng.random() < 0.8}
    cancel_after = rng.randint(1, 8) if body["stream"] and rng.random() < 0.1 else None
    if not body["stream"]:
        response = await client.post("/v1/completions", json=body)
        if response.status_code != 200:
            result.errors.append(f"{response.status_code} {response.text[:200]}")
            return
        result.ok += 1
        return
    async with client.stream("POST", "/v1/completions", json=body) as response:
        events = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if '"error"' in line:
                result.errors.append(line[:200])
                return
            if cancel_after is not None and events >= cancel_after:
                result.cancelled += 1
                return
    result.ok += 1


async def _client(url: str, seed: int, vocab: int, max_prompt: int, until: float,
                  result: SoakResult) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < until:
            await _one_request(client, rng, vocab, max_prompt, result)


async def _sample(rss: Callable[[], dict[str, int]], every_s: float, until: float,
                  result: SoakResult) -> None:
    start = time.monotonic()
    while time.monotonic() < until:
        sizes = await asyncio.to_thread(rss)
        result.samples.append((time.monotonic() - start, sizes))
        await asyncio.sleep(every_s)


def soak(url: str, rss: Callable[[], dict[str, int]], seconds: float, streams: int = 4,
         vocab: int = 512, max_prompt: int = 1500, sample_every_s: float = 1.0,
         seed: int = 0) -> SoakResult:
    """Runs `streams` clients against `url` for `seconds`, sampling `rss()` meanwhile; prompts
    of 4 to `max_prompt` token ids below `vocab`."""
    result = SoakResult()

    async def main() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(_sample(rss, sample_every_s, until, result),
                             *(_client(url, seed + i, vocab, max_prompt, until, result)
                               for i in range(streams)))

    asyncio.run(main())
    return result


def sustained_growth(samples: list[tuple[float, dict[str, int]]]) -> dict[str, tuple[int, int]]:
    """Per process seen throughout: (median RSS of the middle third, of the last third)."""
    thirds = len(samples) // 3
    middle, last = samples[thirds:2 * thirds], samples[2 * thirds:]
    names = set.intersection(*(set(sizes) for _, sizes in samples)) if samples else set()
    return {name: (int(statistics.median(s[name] for _, s in middle)),
                   int(statistics.median(s[name] for _, s in last))) for name in names}
