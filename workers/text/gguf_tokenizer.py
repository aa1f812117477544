"""The tokenizer a GGUF file describes in its metadata, as an HF `tokenizers` tokenizer.

Supported: `tokenizer.ggml.model` "gpt2", byte-level BPE. The vocabulary (`tokens`, already
spelled in the byte-level alphabet), `merges` ("a b" pairs) and `token_type` (3: control
tokens, matched whole and skipped when decoding; 4: user-defined tokens, matched whole) come
from the file. How text is split before BPE is not stored, only named (`tokenizer.ggml.pre`),
so each name maps to the split llama.cpp uses for it (llama-vocab.cpp). SentencePiece ("llama")
vocabularies are not built here; such a file fails with the field and value named.
"""

from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from workers.errors import InvalidModelConfig
from workers.model.gguf_file import GGUFFile
from workers.text.tokenizer import TokenizerSource

CONTROL, USER_DEFINED = 3, 4
"""`tokenizer.ggml.token_type` values (llama.cpp's llama_token_type)."""

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


PRE_TOKENIZERS = {
    "gpt-2": _gpt2,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "llama-bpe": lambda: _split(_LLAMA3_SPLIT),
    "qwen2": lambda: _split(_QWEN2_SPLIT),
}
"""`tokenizer.ggml.pre` -> the split before byte-level BPE."""


def read_gguf_tokenizer(gguf: GGUFFile) -> TokenizerSource:
    """The file's tokenizer, special tokens, chat template and end-of-turn ids."""
    model = gguf.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise InvalidModelConfig(
            "tokenizer.ggml.model", f"{model!r} is not supported (only 'gpt2', byte-level BPE)"
        )
    tokens: list[str] = gguf.require("tokenizer.ggml.tokens")
    backend = _byte_level_bpe(gguf, tokens)
    metadata = gguf.metadata
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    end_ids = [metadata[key] for key in ("tokenizer.ggml.eot_token_id",
                                         "tokenizer.ggml.eom_token_id") if key in metadata]
    return TokenizerSource(
        backend=backend,
        bos_token=None if bos_id is None else tokens[bos_id],
        eos_token=None if eos_id is None else tokens[eos_id],
        chat_template=metadata.get("tokenizer.chat_template"),
        eos_token_ids=tuple(int(i) for i in end_ids),
    )


def _byte_level_bpe(gguf: GGUFFile, tokens: list[str]) -> tokenizers.Tokenizer:
    pre = gguf.metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise InvalidModelConfig(
            "tokenizer.ggml.pre", f"{pre!r} is not supported; supported: {sorted(PRE_TOKENIZERS)}"
        )
    merges = [tuple(merge.split(" ", 1)) for merge in gguf.require("tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(
        models.BPE(vocab, merges, ignore_merges=pre == "llama-bpe")
    )
    if pre == "qwen2":
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    _add_whole_tokens(backend, tokens, gguf.metadata.get("tokenizer.ggml.token_type", []))
    return backend


def _add_whole_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[Any]) -> None:
    """Control tokens (<|im_start|>) as special tokens, user-defined ones as added tokens, so
    text containing them maps to their ids instead of being cut into pieces."""
    special = [tokens[i] for i, kind in enumerate(types) if kind == CONTROL]
    added = [tokens[i] for i, kind in enumerate(types) if kind == USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
