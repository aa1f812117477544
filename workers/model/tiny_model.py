"""`kvrelay make-tiny-model DIR`: a small random checkpoint that transformers can load.

Writes config.json, model.safetensors (random, deterministic by seed), a byte-level BPE
tokenizer.json trained on a small built-in English corpus, tokenizer_config.json (bos/eos
and a ChatML-style chat template) and generation_config.json. Used as the model of the fast
CPU tests. VARIANTS lists the architectures tests cover.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from workers.attention.torch_backend import TorchAttentionBackend
from workers.model.config import ModelConfig
from workers.model.llama import LlamaForCausalLM
from workers.model.weights import random_tensors

SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BOS, EOS, IM_START, IM_END = range(4)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEIGHT_STD = 0.15
"""Large enough that logits are peaked and greedy outputs differ between prompts."""

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {}),
    "llama3_rope": (
        "LlamaForCausalLM",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "linear_rope": ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama_bias": ("LlamaForCausalLM", {"attention_bias": True}),
    "mistral": ("MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", {"use_sliding_window": False}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 32, "use_sliding_window": False}),
    "mqa": ("LlamaForCausalLM", {"num_key_value_heads": 1}),
    "tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
}

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still tell a story.
Once upon a time there was a little robot who wanted to learn how to read and write.
Every morning the robot walked to the library, opened a book and read one page aloud.
The librarian smiled and said: reading one page a day is how every reader begins.
Prefill computes the keys and values of the prompt; decode adds one token at a time.
Blocks of the cache hold sixteen tokens each, and a table maps a sequence to its blocks.
When the cluster is busy, the router sends short prompts straight to a decode worker.
Hello, world! How are you today? I am fine, thank you, and you?
Numbers like 1, 2, 3, 42, 100 and 2048 appear in text, as do dates such as 2026-11-23.
Caf\u00e9, na\u00efve, \u00fcber and \u00e5 are words with accents; \u4f60\u597d means hello.
The weather was cold and the wind was strong, so the children stayed inside and played.
She asked a question, he gave an answer, and together they wrote the program in Python.
def add(a, b): return a + b  # code appears in chats too, with brackets [] and braces {}.
Water boils at one hundred degrees, and ice melts when the sun comes out in spring.
"""


def build_config(arch: str, vocab_size: int, **overrides: Any) -> dict[str, Any]:
    config = {
        "architectures": [arch],
        "model_type": arch.removesuffix("ForCausalLM").lower(),
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def train_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """Byte-level BPE (every byte encodable), deterministic for a fixed corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    return tokenizer


def write_tokenizer_files(folder: Path, tokenizer: Tokenizer) -> None:
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "</s>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 2048,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    generation = {"bos_token_id": BOS, "eos_token_id": [EOS, IM_END]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def random_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """HF-named random tensors; the names come from our own model's checkpoint map."""
    with torch.device("meta"):
        model = LlamaForCausalLM(ModelConfig.from_dict(config), TorchAttentionBackend())
    return {name: t.contiguous() for name, t in random_tensors(model, seed, WEIGHT_STD)}


def make_tiny_model(
    folder: str | Path, arch: str = "LlamaForCausalLM", seed: int = 0, **overrides: Any
) -> Path:
    """Writes a tiny checkpoint of `arch` to `folder` (created); overrides are config.json
    keys. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    config = build_config(arch, tokenizer.get_vocab_size(), **overrides)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_weights(config, seed), str(folder / "model.safetensors"))
    write_tokenizer_files(folder, tokenizer)
    return folder


def make_variant(folder: str | Path, variant: str, seed: int = 0) -> Path:
    """make_tiny_model for one of VARIANTS by name."""
    arch, overrides = VARIANTS[variant]
    return make_tiny_model(folder, arch, seed, **overrides)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvrelay make-tiny-model", description=__doc__)
    parser.add_argument("folder")
    parser.add_argument("--variant", default="llama", choices=sorted(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers")
    args = parser.parse_args(argv)
    arch, overrides = VARIANTS[args.variant]
    if args.layers is not None:
        overrides = {**overrides, "num_hidden_layers": args.layers}
    folder = make_tiny_model(args.folder, arch, args.seed, **overrides)
    print(f"wrote tiny {args.variant} model to {folder}")
    return 0
