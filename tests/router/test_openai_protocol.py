"""Request validation, response formats, the error -> status map and admission, without HTTP
(test_gateway.py checks the same through real requests)."""

from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from router import http_errors, sse
from router.admission import Admission
from router.openai_protocol import (
    chat_logprobs,
    check_request,
    completion_logprobs,
    prompt_token_ids,
    sampling_params,
)
from router.request_models import ChatCompletionRequest, CompletionRequest
from workers import errors
from workers.errors import InvalidParameter, PromptTooLong, QueueFull
from workers.text.tokenizer import Tokenizer


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(prompt=fields.pop("prompt", "hi"), **fields)


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def test_max_tokens_defaults_follow_openai_and_fit_the_context():
    assert sampling_params(completion(), 10, 100).max_tokens == 16
    assert sampling_params(completion(), 90, 100).max_tokens == 10  # shortened, not refused
    assert sampling_params(chat(), 10, 100).max_tokens == 90  # chat: the rest of the context
    both = chat(max_tokens=5, max_completion_tokens=7)
    assert sampling_params(both, 10, 100).max_tokens == 7


def test_context_overflow_errors_carry_the_numbers():
    with pytest.raises(PromptTooLong) as too_long:
        sampling_params(completion(), 100, 100)
    assert (too_long.value.length, too_long.value.max) == (100, 99)
    with pytest.raises(InvalidParameter) as over:
        sampling_params(chat(max_completion_tokens=60), 50, 100)
    assert over.value.field == "max_completion_tokens"
    assert "50" in over.value.message and "110" in over.value.message
    with pytest.raises(InvalidParameter) as zero:
        sampling_params(completion(max_tokens=0), 5, 100)
    assert zero.value.field == "max_tokens"


def test_sampling_params_of_a_request():
    req = completion(temperature=0.5, top_p=0.9, top_k=-1, min_p=0.1, seed=3, stop="\n",
                     presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                     ignore_eos=True, min_tokens=2, max_tokens=8, logprobs=3,
                     stop_token_ids=[7])
    params = sampling_params(req, 4, 64)
    assert params.stop == ("\n",) and params.top_k == 0 and params.logprobs == 3
    assert (params.seed, params.min_tokens, params.ignore_eos) == (3, 2, True)
    assert params.stop_token_ids == (7,) and params.max_tokens == 8
    assert sampling_params(chat(logprobs=True, top_logprobs=4), 4, 64).logprobs == 4
    assert sampling_params(chat(logprobs=True), 4, 64).logprobs == 0
    assert sampling_params(chat(), 4, 64).logprobs is None


@pytest.mark.parametrize(
    ("model", "fields", "field"),
    [
        (CompletionRequest, {"n": 3}, "n"),
        (CompletionRequest, {"echo": True}, "echo"),
        (CompletionRequest, {"best_of": 2}, "best_of"),
        (CompletionRequest, {"logit_bias": {"5": 1.0}}, "logit_bias"),
        (ChatCompletionRequest, {"tools": [{"type": "function", "function": {"name": "f"}}]},
         "tools"),
        (ChatCompletionRequest, {"response_format": {"type": "json_object"}},
         "response_format"),
    ],
)
def test_unsupported_options_are_refused_by_name(model, fields, field):
    base = {"prompt": "hi"} if model is CompletionRequest else \
        {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValidationError) as refused:
        model.model_validate({**base, **fields})
    [error] = refused.value.errors()
    assert error["type"] == "unsupported_parameter" and error["loc"] == (field,)
    # The value that asks for nothing is accepted (clients send defaults explicitly).
    neutral = {"n": 1, "echo": False, "best_of": 1, "logit_bias": {}, "tools": [],
               "response_format": {"type": "text"}}[field]
    model.model_validate({**base, field: neutral})


def test_top_logprobs_needs_logprobs():
    with pytest.raises(InvalidParameter) as refused:
        check_request(chat(top_logprobs=2))
    assert refused.value.field == "top_logprobs"


@pytest.mark.parametrize(("fields", "field"), [({"temperature": -0.1}, "temperature"),
                                               ({"top_p": 1.5}, "top_p"),
                                               ({"min_tokens": 20, "max_tokens": 4},
                                                "min_tokens"),
                                               ({"logprobs": 21}, "logprobs")])
def test_out_of_range_values_name_their_field(fields, field):
    with pytest.raises(InvalidParameter) as bad:
        sampling_params(completion(**fields), 4, 64)
    assert bad.value.field == field


def test_prompt_shapes(tiny_model_dir):
    tokenizer = Tokenizer(tiny_model_dir)
    assert completion(prompt=["only one"]).prompt == "only one"
    assert completion(prompt=[[1, 2, 3]]).prompt == [1, 2, 3]
    with pytest.raises(ValidationError):
        completion(prompt=["a", "b"])
    assert prompt_token_ids(completion(prompt="hello world"), tokenizer) == \
        tokenizer.encode("hello world")
    assert prompt_token_ids(completion(prompt=[5, 6]), tokenizer) == [5, 6]
    with pytest.raises(errors.EmptyPrompt):
        prompt_token_ids(completion(prompt=[]), tokenizer)
    with pytest.raises(ValidationError):
        completion(prompt=[-1])
    with pytest.raises(ValidationError) as image:
        ChatCompletionRequest(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}])
    assert image.value.errors()[0]["loc"] == ("messages", 0, "content")
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "robot", "content": "x"}])
    # A --dummy-config model has no tokenizer: token ids still work, text is a 400 by name.
    assert prompt_token_ids(completion(prompt=[5, 6]), None) == [5, 6]
    for request_, field in ((completion(prompt="hi"), "prompt"), (chat(), "messages")):
        with pytest.raises(InvalidParameter) as no_tokenizer:
            prompt_token_ids(request_, None)
        assert no_tokenizer.value.field == field


def test_logprob_formats():
    entries = [{"token_id": 1, "logprob": -0.5, "top": [[1, -0.5], [2, -1.5]]},
               {"token_id": 2, "logprob": -0.25, "top": [[2, -0.25]]}]
    text = {1: "ab", 2: "é"}.__getitem__
    legacy = completion_logprobs(entries, text, text_offset=3)
    assert legacy == {"tokens": ["ab", "é"], "token_logprobs": [-0.5, -0.25],
                      "top_logprobs": [{"ab": -0.5, "é": -1.5}, {"é": -0.25}],
                      "text_offset": [3, 5]}
    content = chat_logprobs(entries, text)["content"]
    assert content[1]["bytes"] == [0xC3, 0xA9]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["ab", "é"]


def test_stream_formatter_chat_and_usage():
    stream = sse.StreamFormatter(True, "chatcmpl-1", 7, "m", include_usage=True, logprobs=None)
    assert stream.opening()[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert stream.delta("", [], None) is None
    last = stream.delta("hi", [], "stop")
    assert last["choices"][0] == {"index": 0, "delta": {"content": "hi"}, "logprobs": None,
                                  "finish_reason": "stop"}
    assert last["usage"] is None
    assert stream.usage({"prompt_tokens": 1})["choices"] == []
    assert sse.event({"a": 1}) == b'data: {"a":1}\n\n' and sse.DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidParameter("top_p", "bad"), 400),
        (PromptTooLong(300, 255), 400),
        (errors.EmptyPrompt(), 400),
        (errors.UnknownTokenIds([999], 10), 400),
        (errors.UnknownModel("x", ["tiny"]), 404),
        (QueueFull(2.2, 8, 8), 429),
        (errors.NoReadyWorker("decode"), 503),
        (errors.NoCapacity(9, 2), 503),
        (errors.RequestTimeout(1.0, 3), 504),
        (errors.TransferFailed("r1", "peer gone"), 503),
        (errors.TransferTimeout("r1", 5.0, 5.2), 503),
        (errors.HandshakeMismatch("block_size", 16, 8), 503),
        (errors.RouterUnavailable("ActorDiedError"), 503),
        (errors.InternalError("decode-0"), 500),
        (RuntimeError("boom"), 500),
    ],
)
def test_every_error_type_has_one_status(error, status):
    raised = http_errors.from_exception(error)
    travelled = http_errors.from_chunk(type(error).__name__, str(error))
    assert raised.status == travelled.status == status
    body = raised.body["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    if status in (429, 503):
        assert int(raised.headers["Retry-After"]) >= 1
    if isinstance(error, QueueFull):
        assert raised.headers["Retry-After"] == "3"  # 2.2 s rounded up
    if status == 500:
        assert body["type"] == "internal_error"
    else:
        assert "internal" not in body["type"]


@pytest.mark.parametrize(("name", "code"), [
    ("PromptTooLong", "prompt_too_long"), ("InvalidJSON", "invalid_json"),
    ("HTTPError", "http_error"), ("NoCapacity", "no_capacity"),
    ("unknown_parameter", "unknown_parameter"), ("KVTransferFailed", "kv_transfer_failed"),
])
def test_error_codes_are_snake_case(name, code):
    assert http_errors.snake_case(name) == code


def test_validation_errors_become_400_naming_the_field():
    try:
        CompletionRequest.model_validate({"prompt": "x", "max_tokens": "lots"})
    except ValidationError as exc:
        raw = exc.errors()
    errors_ = [{**e, "loc": ("body", *e["loc"])} for e in raw]
    mapped = http_errors.from_validation(RequestValidationError(errors_))
    assert mapped.status == 400 and mapped.body["error"]["param"] == "max_tokens"


def test_admission_refuses_past_the_limit_and_estimates_retry_after():
    admission = Admission(max_in_flight=2, initial_latency_s=4.0)
    admission.admit()
    admission.admit()
    with pytest.raises(QueueFull) as full:
        admission.admit()
    assert (full.value.queued, full.value.limit) == (2, 2)
    assert full.value.retry_after == pytest.approx(2.0)  # 4 s per request over 2 slots
    admission.release(latency_s=None)
    admission.admit()
    assert admission.in_flight == 2 and admission.refused == 1
    admission.release(0.0)
    admission.release(0.0)
    assert admission.mean_latency_s < 4.0
    with pytest.raises(RuntimeError):
        admission.release()
    unlimited = Admission(0)
    for _ in range(100):
        unlimited.admit()
