"""Fixtures of the engine tests (tests/workers/test_engine*.py).

- `make_engine(**overrides)`: the engine of a role (`build_engine`) on the tiny model (CPU,
  float32, small pool); after the test, every engine it built must have no unfinished
  request and every KV block free again (the no-leak invariant: no block referenced;
  blocks kept by the prefix cache for later requests are referenced by nobody, so they
  count as free).
- `hf_greedy(model_dir, prompts, num_new, **generate_kwargs)`: transformers'
  `generate(do_sample=False)` continuations, exactly `num_new` tokens each (EOS banned with
  min_new_tokens, as the engine's min_tokens does), cached.
- `random_prompts(n, seed, lengths)`: token-id prompts clear of the special ids.
- `spec_engine(method, k, draft, role, ...)`: `make_engine` with speculative decoding (same
  no-leak check); `draft_model_dir` a second tiny checkpoint, `medusa_dir` random heads.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable

import pytest
import torch

from workers.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from workers.engine.engine import LLMEngine
from workers.engine.role_engines import build_engine
from workers.model.tiny_model import make_tiny_model
from workers.spec.medusa import make_random_medusa


def assert_drained(engines) -> None:
    """A fixture's engines at teardown: nothing left running, every KV block free."""
    for engine in engines:
        assert not engine.has_unfinished()
        assert engine.num_free_blocks == engine.num_total_blocks, "KV blocks leaked"


@pytest.fixture
def make_engine(tiny_model_dir) -> Callable[..., LLMEngine]:
    engines: list[LLMEngine] = []

    def make(
        model_dir=None,
        num_blocks=256,
        block_size=4,
        role="colocated",
        device="cpu",
        attention_backend="torch",
        prefix_caching=True,
        **sched,
    ) -> LLMEngine:
        config = EngineConfig(
            model=str(model_dir or tiny_model_dir),
            dtype="float32",
            device=device,
            attention_backend=attention_backend,
            role=role,
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                              enable_prefix_caching=prefix_caching),
            scheduler=SchedulerConfig(**sched),
        )
        engines.append(build_engine(config))
        return engines[-1]

    yield make
    assert_drained(engines)


@pytest.fixture(scope="session")
def hf_greedy(hf_reference) -> Callable[..., list[list[int]]]:
    @functools.lru_cache(maxsize=128)
    def one(model_dir: str, prompt: tuple[int, ...], num_new: int, kwargs: tuple) -> tuple:
        model = hf_reference(model_dir)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=num_new,
                min_new_tokens=num_new,
                **dict(kwargs),
            )
        return tuple(out[0, len(prompt) :].tolist())

    def greedy(model_dir, prompts, num_new: int, **generate_kwargs) -> list[list[int]]:
        kwargs = tuple(sorted(generate_kwargs.items()))
        return [list(one(str(model_dir), tuple(p), num_new, kwargs)) for p in prompts]

    return greedy


@pytest.fixture(scope="session")
def random_prompts() -> Callable[..., list[list[int]]]:
    def make(n: int, seed: int = 0, lengths: tuple[int, int] = (3, 40)) -> list[list[int]]:
        rng = random.Random(seed)
        return [[rng.randrange(4, 512) for _ in range(rng.randint(*lengths))] for _ in range(n)]

    return make


@pytest.fixture(scope="session")
def draft_model_dir(tmp_path_factory):
    """A second tiny checkpoint: same tokenizer and vocab, other random weights."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-draft"), seed=1)


@pytest.fixture
def spec_engine(tiny_model_dir):
    engines: list[LLMEngine] = []

    def make(method=None, k=0, draft=None, role="colocated", num_blocks=256, block_size=4,
             model_dir=None, medusa_tree="chain", attention_backend="torch",
             **sched) -> LLMEngine:
        config = EngineConfig(
            model=str(model_dir or tiny_model_dir), dtype="float32", device="cpu", role=role,
            attention_backend=attention_backend,
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
            scheduler=SchedulerConfig(**sched),
            speculative=SpeculativeConfig(method, k, None if draft is None else str(draft),
                                          medusa_tree=medusa_tree),
        )
        engines.append(build_engine(config))
        return engines[-1]

    yield make
    assert_drained(engines)


@pytest.fixture(scope="session")
def medusa_dir(tmp_path_factory, tiny_model_dir):
    """Random Medusa heads (4 heads, 1 residual block each) of the tiny model's shape."""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    return make_random_medusa(tmp_path_factory.mktemp("medusa"), config["hidden_size"],
                              config["vocab_size"], num_heads=4)
