"""Shared fixtures: tiny checkpoints on disk and their Hugging Face reference models.

- `tiny_model_dir`: the default tiny Llama checkpoint (session-wide, written once).
- `make_model_dir(variant)`: a tiny checkpoint of one of workers.model.tiny_model.VARIANTS
  ('llama', 'llama3_rope', 'mistral', 'qwen2', 'qwen3', 'mqa', 'tied', ...), cached.
- `hf_reference(model_dir)`: the transformers model of a folder, float32 on CPU, eval mode,
  cached (transformers is imported only when a test asks for it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from workers.model.presets import load_preset
from workers.model.tiny_model import make_variant


@pytest.fixture(scope="module")
def local_ray():
    """A module's own local Ray (2 CPUs, as CI has)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, namespace="kvrelay", ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    folders: dict[str, Path] = {}

    def make(variant: str = "llama") -> Path:
        if variant not in folders:
            folder = tmp_path_factory.mktemp(f"tiny-{variant}")
            folders[variant] = make_variant(folder, variant)
        return folders[variant]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_model_dir: Callable[[str], Path]) -> Path:
    return make_model_dir("llama")


@functools.lru_cache(maxsize=16)
def _load_hf_reference(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_reference() -> Callable:
    """Returns hf_reference(model_dir) -> transformers model (float32, CPU, cached)."""
    return lambda model_dir: _load_hf_reference(str(model_dir))


def build_step(seqs: list[tuple[list[int], int, list[int]]], block_size: int, logits: str = "last"):
    """A StepInput for sequences given as (tokens so far incl. this step's, number of new
    tokens at the end, block table). logits='last': the last token of each sequence;
    'all': every new token."""
    from workers.engine.step_input import StepInput

    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    logits_indices: list[int] = []
    for tokens, num_new, table in seqs:
        first = len(tokens) - num_new
        for pos in range(first, len(tokens)):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        token_ids += tokens[first:]
        ends = len(token_ids)
        logits_indices += [ends - 1] if logits == "last" else list(range(starts[-1], ends))
        starts.append(ends)
        seq_lens.append(len(tokens))
        tables.append(list(table))
    return StepInput(
        seq_ids=[str(i) for i in range(len(seqs))],
        token_ids=token_ids,
        positions=positions,
        slot_mapping=slots,
        query_start_loc=starts,
        seq_lens=seq_lens,
        block_tables=tables,
        logits_indices=logits_indices,
    )


@pytest.fixture(scope="session")
def make_step() -> Callable:
    """Returns build_step(seqs, block_size, logits='last') -> StepInput (see build_step)."""
    return build_step


@pytest.fixture
def llama3_8b_config() -> dict:
    """Meta-Llama-3.1-8B's config.json (no weights): for shape tests on 'meta' or dummy."""
    return load_preset("llama3-8b")
