"""OpenAI-compatible requests turned into `SamplingParams` fields, and the response bodies.

The request models (router/request_models.py) check shapes and types; `check_request` the
rules between fields and of message roles; `sampling_params` what depends on the prompt (the
context limit); then `SamplingParams` checks ranges. Names and defaults follow OpenAI, plus
vLLM's extensions (top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids,
skip_special_tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from router.request_models import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Request,
    SimpleGenerateRequest,
)
from workers.engine.sampling_params import SamplingParams
from workers.errors import EmptyPrompt, InvalidParameter, PromptTooLong

# OpenAI's default for /v1/completions; chat defaults to "the rest of the context".
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def check_request(req: Request) -> None:
    """Rules between fields and of message roles (InvalidParameter naming the field)."""
    if isinstance(req, SimpleGenerateRequest) and req.stream:
        raise InvalidParameter("stream", "/v1/generate does not stream; use /v1/completions")
    if not isinstance(req, ChatCompletionRequest):
        return
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidParameter("top_logprobs", "needs logprobs=true")
    for i, message in enumerate(req.messages):
        _check_role(f"messages.[{i}]", message)


def _check_role(path: str, message: ChatMessage) -> None:
    """OpenAI's per-role rules; an assistant message may lack content only beside
    tool_calls, which this server does not support, so every role needs content."""
    if message.content is None:
        raise InvalidParameter(f"{path}.content", f"a '{message.role}' message needs content")
    if message.role == "tool" and not message.tool_call_id:
        raise InvalidParameter(f"{path}.tool_call_id", "a 'tool' message needs tool_call_id")
    if message.role != "tool" and message.tool_call_id is not None:
        raise InvalidParameter(f"{path}.tool_call_id", "only a 'tool' message has one")


def sampling_params(req: Request, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """The SamplingParams of `req` (validated), given the prompt's length and the context.

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
        "num_speculative_tokens": req.num_speculative_tokens,
    }
    try:
        return SamplingParams(**fields)
    except InvalidParameter as exc:  # named as the client sent it
        sent = {"max_tokens": field, "logprobs": _logprobs_field(req)}.get(exc.field, exc.field)
        raise InvalidParameter(sent, exc.message) from None


def _requested_max_tokens(req: Request) -> tuple[int | None, str]:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens, "max_completion_tokens"
    if isinstance(req, CompletionRequest) and req.max_tokens is None:
        # OpenAI's default, shortened (not refused) when the prompt leaves less room.
        return None, "max_tokens"
    return req.max_tokens, "max_tokens"


def _logprobs_field(req: Request) -> str:
    return "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"


def _num_logprobs(req: Request) -> int | None:
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


# ---- responses ---------------------------------------------------------------------------


def usage(num_prompt_tokens: int, num_output_tokens: int,
          num_cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "total_tokens": num_prompt_tokens + num_output_tokens,
            "prompt_tokens_details": {"cached_tokens": num_cached_tokens}}


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
    needs_text = isinstance(req, ChatCompletionRequest) or isinstance(req.prompt, str)
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
        ids = tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
    if not ids:
        raise EmptyPrompt()
    return ids


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    data = {"role": message.role, "content": message.text()}
    for key in ("name", "tool_call_id"):
        if getattr(message, key) is not None:
            data[key] = getattr(message, key)
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
