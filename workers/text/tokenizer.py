"""`Tokenizer`: HF `tokenizers` plus the checkpoint's tokenizer_config.json (special tokens,
chat template) and generation_config.json (eos ids), without transformers; or all of it from a
GGUF file's metadata (workers/text/gguf_tokenizer.py).

The chat template is rendered with jinja2 the way transformers does (sandboxed, trim_blocks,
lstrip_blocks, `raise_exception`, `tojson`). `IncrementalDetokenizer` turns a stream of token
ids into text deltas that never split a multi-byte UTF-8 character.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from workers.actors.host_memory import release_free_memory
from workers.errors import CheckpointFileMissing, InvalidParameter, PromptTooLong
from workers.model.gguf_file import GGUFFile, is_gguf

# Texts this long leave hundreds of MB of freed per-token buffers behind: given back at once.
_RELEASE_AFTER_CHARS = 1 << 20


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    # tokenizer_config stores special tokens as strings or as AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _load_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {item["name"]: item["template"] for item in template}
        template = named.get("default")
    jinja_file = folder / "chat_template.jinja"  # where transformers 5 saves it
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    return template


@dataclass(frozen=True)
class TokenizerSource:
    """What a Tokenizer is built from, whichever files it was read from."""

    backend: tokenizers.Tokenizer
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    eos_token_ids: tuple[int, ...]
    """End ids besides eos_token's (generation_config.json's eos_token_id, GGUF's eot id)."""


def _read_folder(folder: Path) -> TokenizerSource:
    """tokenizer.json, tokenizer_config.json and generation_config.json of a checkpoint."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointFileMissing(str(path))
    config = _read_json(folder / "tokenizer_config.json")
    eos_ids = _read_json(folder / "generation_config.json").get("eos_token_id")
    eos_ids = [] if eos_ids is None else eos_ids if isinstance(eos_ids, list) else [eos_ids]
    return TokenizerSource(
        backend=tokenizers.Tokenizer.from_file(str(path)),
        bos_token=_token_content(config.get("bos_token")),
        eos_token=_token_content(config.get("eos_token")),
        chat_template=_load_chat_template(folder, config),
        eos_token_ids=tuple(int(i) for i in eos_ids),
    )


def _read_source(path: Path) -> TokenizerSource:
    if is_gguf(path):
        # Imported here: workers.text.gguf_tokenizer builds a TokenizerSource of this module.
        from workers.text.gguf_tokenizer import read_gguf_tokenizer

        return read_gguf_tokenizer(GGUFFile(path))
    return _read_folder(path.parent if path.is_file() else path)


class Tokenizer:
    def __init__(self, path: str | Path):
        """`path`: a checkpoint folder (or a file in it, such as its config.json), or a GGUF
        file whose metadata holds the tokenizer."""
        source = _read_source(Path(path))
        self._tokenizer = source.backend
        self.bos_token = source.bos_token
        self.eos_token = source.eos_token
        self.chat_template = source.chat_template
        self.eos_token_ids = self._collect_eos_ids(source.eos_token_ids)
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.max_tokens: int | None = None
        """`encode` refuses longer texts (see `limited`)."""

    def _collect_eos_ids(self, ids: tuple[int, ...]) -> tuple[int, ...]:
        ids = list(ids)
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            ids.append(self.token_to_id(self.eos_token))
        return tuple(dict.fromkeys(int(i) for i in ids))

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Releases the GIL while the Rust core works (`encode` holds it
        throughout: seconds for a megabytes-long prompt), so other threads (the gateway's
        event loop) run meanwhile; no offsets are tracked (twice as fast, less memory)."""
        (encoding,) = self._tokenizer.encode_batch_fast([text],
                                                        add_special_tokens=add_special_tokens)
        try:
            if self.max_tokens is not None and len(encoding) > self.max_tokens:
                raise PromptTooLong(len(encoding), self.max_tokens)
            return encoding.ids
        finally:
            if len(text) > _RELEASE_AFTER_CHARS:
                del encoding
                release_free_memory()

    def limited(self, max_tokens: int) -> Tokenizer:
        """This tokenizer, its `encode` raising PromptTooLong above `max_tokens` tokens
        before it builds the id list (~0.1 s holding the GIL per million ids)."""
        bounded = copy.copy(self)
        bounded.max_tokens = max_tokens
        return bounded

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The prompt text for a chat; encode it with add_special_tokens=False when the
        template already writes the bos token (as transformers' tokenize=True does)."""
        if self.chat_template is None:
            raise InvalidParameter("messages", "this model has no chat template")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, indent=indent, ensure_ascii=False
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except jinja2.exceptions.TemplateError as error:
            raise InvalidParameter("messages", str(error)) from error


class IncrementalDetokenizer:
    """Streaming text of generated tokens: `add(ids)` returns the new text.

    Decodes a short window of recent tokens (the vLLM scheme): the text of
    ids[prefix:read] is already emitted, ids[prefix:] is decoded, and the difference is the
    delta. A window that ends inside a multi-byte character decodes to U+FFFD, so the delta
    is held back until the character completes. `flush()` emits what is left at the end."""

    CONTEXT_TOKENS = 5
    """Prompt tokens kept as left context, so decoders that treat a leading space specially
    see the same text as in a full decode."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-self.CONTEXT_TOKENS :])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_token_ids: Sequence[int]) -> str:
        self.ids.extend(new_token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(emitted) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(emitted) :]
