"""SmolLM2-135M-Instruct from its GGUF file: `kvrelay generate --model smollm2` prints
transformers' greedy continuation (same file, float32) for a plain prompt and for a question
through the chat template, whose answer names Paris; the template and special tokens come from
the GGUF metadata. (More prompts, batched: tests/cluster/test_smollm2_disaggregated.py.)"""

from __future__ import annotations

import pytest

from tests.smollm2 import CHAT_QUESTION, MAX_TOKENS, PLAIN_PROMPTS, reference, smollm2_path
from workers import generate_cli
from workers.text.tokenizer import Tokenizer

# The first test to ask for the transformers reference loads the GGUF file through the gguf
# package's reader: ~25 s on 2 idle cores, minutes on 2 busy ones.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(smollm2_path())


def expected_text(tokenizer: Tokenizer, label: str) -> str:
    """transformers' continuation up to the first end token, as text."""
    _, tokens = reference()[label]
    ends = [i for i, token in enumerate(tokens) if token in tokenizer.eos_token_ids]
    return tokenizer.decode(tokens[: ends[0]] if ends else tokens)


def generate(capsys, prompt: str, *extra: str) -> str:
    argv = ["--model", "smollm2", "--prompt", prompt, "--max-tokens", str(MAX_TOKENS),
            "--device", "cpu", "--dtype", "float32", "--num-blocks", "64", *extra]
    assert generate_cli.main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_generate_smollm2_matches_transformers(tokenizer, capsys):
    prompt = PLAIN_PROMPTS[0]
    assert generate(capsys, prompt) == expected_text(tokenizer, prompt) + "\n"


def test_generate_smollm2_chat_answers_paris_like_transformers(tokenizer, capsys):
    out = generate(capsys, CHAT_QUESTION, "--chat")
    assert out == expected_text(tokenizer, "chat") + "\n"
    assert "Paris" in out


def test_chat_template_and_special_tokens_come_from_the_gguf(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == tokenizer.token_to_id("<|im_start|>") == 1
    assert tokenizer.eos_token_ids == (tokenizer.token_to_id("<|im_end|>"),)
    assert tokenizer.encode("Paris") == tokenizer.encode("Paris", add_special_tokens=False)
