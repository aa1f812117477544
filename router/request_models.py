"""The OpenAI-compatible request bodies, strict: what parses here is what the client meant.

Rules (docs/contracts.md, "HTTP API: request validation and errors"):
- Types are never coerced: `"max_tokens": "8"`, `"stream": "yes"`, `true` or `1.0` as a token
  id are 400. Floats are finite (no `1e999`, `NaN`); integers fit in 64 bits.
- Unknown fields are refused (400, `code: unknown_parameter`, `param` naming the field), so
  a misspelt option or a 5 MB field nobody reads never passes silently. `user` is the one
  field accepted and ignored (OpenAI's end-user id for abuse monitoring).
- Fields vLLM honours and kvrelay does not implement (`NOT_IMPLEMENTED_*`) are 400
  (`code: unsupported_parameter`) unless their value asks for nothing (`echo: false`,
  `best_of: 1`), since clients such as `vllm bench serve` send such defaults.
Ranges of sampling numbers are checked once, by workers/engine/sampling_params.py; prompt and stop
token ids against the vocabulary by the engine, which knows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator
from pydantic_core import PydanticCustomError

STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

MIN_TIMEOUT_S = 0.1
"""Shortest request `timeout`: below it no request could finish, so it is a client bug."""

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0)]

_COMMON: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logit_bias": ({},),
    "use_beam_search": (False,), "length_penalty": (1.0,),
    "include_stop_str_in_output": (False,), "spaces_between_special_tokens": (True,),
    "truncate_prompt_tokens": (), "allowed_token_ids": (), "bad_words": ([],),
    "prompt_logprobs": (), "response_format": ({"type": "text"},),
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
    "guided_decoding_backend": (), "guided_whitespace_pattern": (), "structured_outputs": (),
    "logits_processors": (), "return_tokens_as_token_ids": (False,), "cache_salt": (),
    "kv_transfer_params": (), "vllm_xargs": (), "request_id": (),
}
NOT_IMPLEMENTED_COMPLETIONS = {**_COMMON, "suffix": ("",), "prompt_embeds": (),
                               "add_special_tokens": (True,)}
NOT_IMPLEMENTED_CHAT = {
    **_COMMON, "tools": ([],), "tool_choice": ("none",), "functions": (), "function_call": (),
    "chat_template": (), "chat_template_kwargs": ({},), "continue_final_message": (False,),
    "add_generation_prompt": (True,), "add_special_tokens": (False,), "documents": (),
    "mm_processor_kwargs": (), "reasoning_effort": (),
}
"""Field -> the values (besides null) that ask for nothing kvrelay lacks."""
NOT_IMPLEMENTED_MESSAGE = {"tool_calls": ([],), "function_call": ()}


def _same(value: Any, neutral: Any) -> bool:
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral


def not_implemented(name: str, table: dict[str, tuple[Any, ...]]) -> type[BaseModel]:
    """A model declaring `table`'s fields (default null), each refused unless neutral."""

    def refuse(cls, value: Any, info: ValidationInfo) -> Any:
        neutral = table[info.field_name]
        if value is None or any(_same(value, n) for n in neutral):
            return value
        allowed = " (only " + ", ".join(repr(n) for n in neutral) + ")" if neutral else ""
        raise PydanticCustomError("unsupported_parameter",
                                  "'{field}' is not supported by this server{allowed}",
                                  {"field": info.field_name, "allowed": allowed})

    return create_model(name, __config__=STRICT,
                        __validators__={"refuse": field_validator(*table)(refuse)},
                        **{field: (Any, None) for field in table})


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int and t >= 0 for t in value)


def _one_prompt(value: Any) -> str | list[int]:
    """The one prompt of a request: text or token ids; a batch of one is unwrapped."""
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if len(value) != 1:
            raise PydanticCustomError("unsupported_parameter",
                                      "only one prompt per request, got {count}",
                                      {"count": len(value)})
        value = value[0]
    if isinstance(value, str) or _token_ids(value):
        return value
    raise PydanticCustomError("invalid_prompt", "must be a string or a list of token ids "
                                                "(integers >= 0), or a list of one of those")


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False
    continuous_usage_stats: Literal[False] = False


class _SamplingFields(BaseModel):
    """Fields shared by every generation endpoint."""

    model_config = STRICT

    model: str | None = None
    user: str | None = None
    """OpenAI's end-user id; accepted and ignored (it changes no output)."""
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    seed: int | None = None
    """Range checked by SamplingParams (torch's: -2**63 <= seed < 2**64)."""
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    num_speculative_tokens: int | None = None
    """Speculative decoding: drafts per step for this request (0: none; None: the server's
    --num-speculative-tokens). Range checked by SamplingParams."""
    priority: Int64 = 0
    """Lower runs first when the workers' SchedulerConfig.policy is "priority"; refused (by
    the engine, which knows the policy) unless 0 under fcfs."""
    timeout: float | None = Field(default=None, ge=MIN_TIMEOUT_S)
    """Seconds until the gateway gives up on the request (capped by the server's limit)."""
    return_token_ids: bool = False
    """vLLM's extension: every choice (and stream chunk) also carries `token_ids`, the new
    tokens' ids, so a model without a tokenizer still streams one chunk per token."""


class _Prompt(BaseModel):
    model_config = STRICT

    prompt: Any
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one(cls, value: Any) -> str | list[int]:
        return _one_prompt(value)


class CompletionRequest(
    _SamplingFields, _Prompt, not_implemented("CompletionExtras", NOT_IMPLEMENTED_COMPLETIONS)
):
    pass


class ChatMessage(not_implemented("MessageExtras", NOT_IMPLEMENTED_MESSAGE)):
    """One message; rules that depend on its role are in `check_message_roles`."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Any = None
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if value is None or isinstance(value, str) or (isinstance(value, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                and isinstance(p["text"], str) for p in value)):
            return value
        raise PydanticCustomError("invalid_content", "must be a string or a list of text "
                                                     "parts ({'type': 'text', 'text': ...})")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part["text"] for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields, not_implemented("ChatExtras", NOT_IMPLEMENTED_CHAT)):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class SimpleGenerateRequest(_SamplingFields, _Prompt):
    """POST /v1/generate: `{prompt, max_tokens, ...}` -> `{text, tokens_generated, ...}`."""


Request = CompletionRequest | ChatCompletionRequest | SimpleGenerateRequest

_MODELS = (CompletionRequest, ChatCompletionRequest, SimpleGenerateRequest, ChatMessage,
           StreamOptions)
FIELD_NAMES = frozenset(name for model in _MODELS for name in model.model_fields)


def field_path(loc: Sequence[str | int], unknown: bool = False) -> str | None:
    """The request field a validation error is about, as OpenAI writes it
    (`messages.[0].content`): pydantic's union-member labels (`str`, `list[int]`) dropped.
    `unknown`: the last part is a field the client sent that no model declares."""
    parts = [f"[{part}]" if isinstance(part, int) else part
             for part in (loc[:-1] if unknown else loc)
             if isinstance(part, int) or part in FIELD_NAMES]
    if unknown and loc:
        parts.append(str(loc[-1]))
    return ".".join(parts) or None
