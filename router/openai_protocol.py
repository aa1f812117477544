"""OpenAI-compatible request schemas and their validation into `SamplingParams` fields.

Pydantic checks shapes and types (the gateway turns its errors into 400 naming the field);
`sampling_fields` checks what depends on the prompt (the context limit) and on OpenAI's rules
(only n=1, top_logprobs needs logprobs), then `SamplingParams` checks ranges. Names and
defaults follow OpenAI, plus vLLM's extensions (top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids, skip_special_tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from workers.errors import EmptyPrompt, InvalidParameter, PromptTooLong
from workers.sampling_params import SamplingParams

# OpenAI's default for /v1/completions; chat defaults to "the rest of the context".
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by every generation endpoint."""

    # Unknown fields are ignored (OpenAI SDKs send some we have no use for, e.g. `user`).
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    priority: int = 0
    timeout: float | None = Field(default=None, gt=0)
    """Seconds until the gateway gives up on the request (capped by the server's limit)."""
    logit_bias: dict[str, float] | None = None
    return_token_ids: bool = False
    """vLLM's extension: every choice (and stream chunk) also carries `token_ids`, the new
    tokens' ids, so a model without a tokenizer still streams one chunk per token."""


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class SimpleGenerateRequest(_SamplingFields):
    """POST /v1/generate: `{prompt, max_tokens, ...}` -> `{text, tokens_generated, ...}`."""

    prompt: str | list[int]
    logprobs: int | None = None


Request = CompletionRequest | ChatCompletionRequest | SimpleGenerateRequest


def check_unsupported(req: Request) -> None:
    """Rejects (400) what this server does not do, instead of silently ignoring it."""
    if req.n != 1:
        raise InvalidParameter("n", f"only n=1 is supported, got {req.n}")
    if req.logit_bias:
        raise InvalidParameter("logit_bias", "is not supported")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise InvalidParameter("echo", "is not supported")
        if req.suffix:
            raise InvalidParameter("suffix", "is not supported")
        if req.best_of not in (None, 1):
            raise InvalidParameter("best_of", f"only best_of=1 is supported, got {req.best_of}")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidParameter("top_logprobs", "needs logprobs=true")
        if req.tools:
            raise InvalidParameter("tools", "tool calling is not supported")
        if req.response_format and req.response_format.get("type") != "text":
            raise InvalidParameter("response_format", "only {'type': 'text'} is supported")


def single_prompt(prompt: str | list[int] | list[str] | list[list[int]]) -> str | list[int]:
    """The one prompt of a request: a string or token ids (a batch of one is unwrapped)."""
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise InvalidParameter("prompt", f"only one prompt per request, got {len(prompt)}")
        return prompt[0]
    return prompt


def sampling_fields(req: Request, num_prompt_tokens: int, max_model_len: int) -> dict[str, Any]:
    """SamplingParams fields of `req` (validated), given the prompt's length and the context.

    Raises PromptTooLong when the prompt leaves no room for one token, and InvalidParameter
    naming the field when max_tokens reaches past the context (both carry the numbers).
    """
    if num_prompt_tokens >= max_model_len:
        raise PromptTooLong(num_prompt_tokens, max_model_len - 1)
    room = max_model_len - num_prompt_tokens
    max_tokens, field = _requested_max_tokens(req)
    if max_tokens is None:
        default = COMPLETIONS_DEFAULT_MAX_TOKENS if isinstance(req, CompletionRequest) else room
        max_tokens = min(default, room)
    elif max_tokens < 1:
        raise InvalidParameter(field, f"must be >= 1, got {max_tokens}")
    elif max_tokens > room:
        raise InvalidParameter(
            field,
            f"prompt has {num_prompt_tokens} tokens and {field} is {max_tokens}: "
            f"{num_prompt_tokens + max_tokens} exceeds the context length of {max_model_len}",
        )
    fields = {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "seed": req.seed,
        "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        "stop_token_ids": list(req.stop_token_ids or []),
        "ignore_eos": req.ignore_eos,
        "min_tokens": req.min_tokens,
        "logprobs": _num_logprobs(req),
        "skip_special_tokens": req.skip_special_tokens,
    }
    return SamplingParams(**fields).to_dict()


def _requested_max_tokens(req: Request) -> tuple[int | None, str]:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens, "max_completion_tokens"
    if isinstance(req, CompletionRequest) and req.max_tokens is None:
        # OpenAI's default, shortened (not refused) when the prompt leaves less room.
        return None, "max_tokens"
    return req.max_tokens, "max_tokens"


def _num_logprobs(req: Request) -> int | None:
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


# ---- responses ---------------------------------------------------------------------------


def usage(num_prompt_tokens: int, num_output_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "total_tokens": num_prompt_tokens + num_output_tokens}


def completion_logprobs(
    entries: list[dict[str, Any]], token_text: Callable[[int], str], text_offset: int = 0
) -> dict[str, Any]:
    """OpenAI's legacy completions `logprobs` object from the workers' per-token entries
    (`{'token_id', 'logprob', 'top': [[id, logprob], ...]}`); offsets count from
    `text_offset`, the length of the text already sent."""
    tokens, offsets = [], []
    for entry in entries:
        offsets.append(text_offset)
        tokens.append(token_text(entry["token_id"]))
        text_offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{token_text(t): lp for t, lp in e.get("top") or []} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(
    entries: list[dict[str, Any]], token_text: Callable[[int], str]
) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object: `{'content': [{token, logprob, bytes, top_logprobs}]}`."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for entry in entries:
        item = one(entry["token_id"], entry["logprob"])
        item["top_logprobs"] = [one(t, lp) for t, lp in entry.get("top") or []]
        content.append(item)
    return {"content": content}


def completion_response(
    request_id: str, created: int, model: str, text: str, logprobs: dict[str, Any] | None,
    finish_reason: str | None, usage_: dict[str, int],
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": usage_}


def chat_response(
    request_id: str, created: int, model: str, text: str, logprobs: dict[str, Any] | None,
    finish_reason: str | None, usage_: dict[str, int],
) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": usage_}


# ---- prompts -----------------------------------------------------------------------------


def prompt_token_ids(req: Request, tokenizer: Any) -> list[int]:
    """The request's prompt as token ids: chat messages through the chat template, strings
    through the tokenizer, id lists as given. Raises EmptyPrompt, InvalidParameter."""
    needs_text = isinstance(req, ChatCompletionRequest) or isinstance(
        single_prompt(req.prompt), str)
    if tokenizer is None and needs_text:
        # A --dummy-config model has no tokenizer: only token-id prompts can be served.
        field = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        raise InvalidParameter(field, "this model has no tokenizer; send the prompt as a "
                                      "list of token ids to /v1/completions")
    if isinstance(req, ChatCompletionRequest):
        text = tokenizer.apply_chat_template([_message_dict(m) for m in req.messages],
                                             add_generation_prompt=True)
        # A template that writes the bos token itself must not get a second one.
        bos = getattr(tokenizer, "bos_token", None)
        ids = tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))
    else:
        prompt = single_prompt(req.prompt)
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if any(t < 0 for t in ids):
            raise InvalidParameter("prompt", "token ids must be >= 0")
    if not ids:
        raise EmptyPrompt()
    return ids


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    data = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):
        parts = []
        for part in message.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidParameter("messages", "only text content parts are supported")
            parts.append(part["text"])
        data["content"] = "".join(parts)
    data.setdefault("content", "")
    return data


def logprobs_formatter(
    req: Request, token_text: Callable[[int], str]
) -> Callable[[list[dict[str, Any]], int], dict[str, Any]] | None:
    """The endpoint's logprobs format as `f(entries, text_offset)`; None if not asked for."""
    if isinstance(req, ChatCompletionRequest):
        return (lambda entries, _offset: chat_logprobs(entries, token_text)) if req.logprobs \
            else None
    if req.logprobs is None:
        return None
    return lambda entries, offset: completion_logprobs(entries, token_text, offset)


def response_body(
    req: Request, request_id: str, created: int, model: str, text: str,
    logprobs: dict[str, Any] | None, finish_reason: str | None, usage_: dict[str, int],
    latency_s: float,
) -> dict[str, Any]:
    """The non-streaming body of a finished request, in its endpoint's format."""
    if isinstance(req, SimpleGenerateRequest):
        tokens = usage_["completion_tokens"]
        return {"id": request_id, "text": text, "tokens_generated": tokens,
                "prompt_tokens": usage_["prompt_tokens"], "finish_reason": finish_reason,
                "latency_ms": latency_s * 1000.0,
                "tokens_per_second": tokens / latency_s if latency_s > 0 else 0.0}
    build = chat_response if isinstance(req, ChatCompletionRequest) else completion_response
    return build(request_id, created, model, text, logprobs, finish_reason, usage_)
