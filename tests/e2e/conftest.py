"""Fixtures of the e2e tests: the shared 16-request workload and its transformers reference
(`local_ray`, a module's own local Ray, is in tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.cluster.helpers import hf_greedy, prompts
from workers.text.tokenizer import Tokenizer

NUM_REQUESTS = 16


@pytest.fixture(scope="module")
def workload(tiny_model_dir, hf_reference):
    """16 (prompt, max_tokens, stream, expected text) with their transformers reference."""
    tokenizer = Tokenizer(tiny_model_dir)
    model = hf_reference(tiny_model_dir)
    batch = prompts(NUM_REQUESTS, 500, seed=11, low=2, high=48)
    cases = []
    for i, prompt in enumerate(batch):
        max_tokens = 1 + (i * 5) % 14
        expected = tokenizer.decode(hf_greedy(model, prompt, max_tokens))
        cases.append((prompt, max_tokens, i % 2 == 0, expected))
    return cases
