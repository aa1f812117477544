"""Every bad input of issue 12 over real HTTP, with its status, OpenAI error code and `param`.

The gateway (uvicorn) runs over a real in-process engine worker (conftest.py), so refusals
the engine makes (token ids outside the vocabulary, priority under fcfs) are covered too.
"""

from __future__ import annotations

import re

import httpx
import pytest

from router.request_models import MIN_TIMEOUT_S
from tests.router.conftest import MAX_MODEL_LEN, post

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def completion(**fields) -> dict:
    return {"prompt": "hi", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"messages": USER, "max_tokens": 2, **fields}


# (path, body: dict or raw JSON text, status, code, param)
BAD = [
    # 64-bit seeds only (torch's range); never a 500 from generator.manual_seed.
    (COMPLETIONS, completion(seed=2**64), 400, "invalid_parameter", "seed"),
    (COMPLETIONS, completion(seed=-(2**63) - 1), 400, "invalid_parameter", "seed"),
    (CHAT, chat(seed=2**70), 400, "invalid_parameter", "seed"),
    # Token ids are integers: no booleans, no floats.
    (COMPLETIONS, completion(prompt=[False]), 400, "invalid_parameter", "prompt"),
    (COMPLETIONS, completion(prompt=[True]), 400, "invalid_parameter", "prompt"),
    (COMPLETIONS, completion(prompt=[1.0, 2.0]), 400, "invalid_parameter", "prompt"),
    (COMPLETIONS, completion(prompt=[[1, True]]), 400, "invalid_parameter", "prompt"),
    (COMPLETIONS, completion(stop_token_ids=[True]), 400, "invalid_parameter",
     "stop_token_ids.[0]"),
    # Finite numbers (Python's JSON reads 1e999 as inf, NaN as nan).
    (COMPLETIONS, '{"prompt": "hi", "temperature": 1e999}', 400, "invalid_parameter",
     "temperature"),
    (COMPLETIONS, '{"prompt": "hi", "top_p": NaN}', 400, "invalid_parameter", "top_p"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}', 400,
     "invalid_parameter", "temperature"),
    (COMPLETIONS, '{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}", 400,
     "invalid_json", None),
    (COMPLETIONS, completion(top_k=10**30), 400, "invalid_parameter", "top_k"),
    (COMPLETIONS, completion(priority=2**63), 400, "invalid_parameter", "priority"),
    # No coercion from strings.
    (COMPLETIONS, completion(max_tokens="8"), 400, "invalid_parameter", "max_tokens"),
    (COMPLETIONS, completion(stream="yes"), 400, "invalid_parameter", "stream"),
    (CHAT, chat(temperature="0.5"), 400, "invalid_parameter", "temperature"),
    (CHAT, chat(stream_options={"include_usage": "true"}), 400, "invalid_parameter",
     "stream_options.include_usage"),
    # Token ids within the vocabulary (checked by the engine, which knows it).
    (COMPLETIONS, completion(stop_token_ids=[1_000_000]), 400, "invalid_parameter",
     "stop_token_ids"),
    (COMPLETIONS, completion(prompt=[1_000_000]), 400, "unknown_token_ids", "prompt"),
    # Role rules.
    (CHAT, chat(messages=[{"role": "tool", "tool_call_id": "c1"}]), 400, "invalid_parameter",
     "messages.[0].content"),
    (CHAT, chat(messages=[{"role": "tool", "content": "42"}]), 400, "invalid_parameter",
     "messages.[0].tool_call_id"),
    (CHAT, chat(messages=[{"role": "assistant"}]), 400, "invalid_parameter",
     "messages.[0].content"),
    (CHAT, chat(messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]),
     400, "unsupported_parameter", "messages.[0].tool_calls"),
    (CHAT, chat(messages=[{"role": "user", "content": "x", "tool_call_id": "c1"}]), 400,
     "invalid_parameter", "messages.[0].tool_call_id"),
    (CHAT, chat(messages=[{"role": "function", "content": "x"}]), 400, "invalid_parameter",
     "messages.[0].role"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "invalid_parameter", "messages.[0].content"),
    # Unknown fields are refused by name, however big (up to the body limit, past it 413).
    (COMPLETIONS, completion(big_unknown="x" * 3_000_000), 400, "unknown_parameter",
     "big_unknown"),
    (CHAT, chat(messages=[{"role": "user", "content": "x", "mood": "happy"}]), 400,
     "unknown_parameter", "messages.[0].mood"),
    # What vLLM honours and kvrelay does not: refused by name, never ignored.
    (COMPLETIONS, completion(response_format={"type": "json_object"}), 400,
     "unsupported_parameter", "response_format"),
    (COMPLETIONS, completion(guided_json={"type": "object"}), 400, "unsupported_parameter",
     "guided_json"),
    (CHAT, chat(guided_choice=["a", "b"]), 400, "unsupported_parameter", "guided_choice"),
    (CHAT, chat(guided_regex="a+"), 400, "unsupported_parameter", "guided_regex"),
    (CHAT, chat(guided_grammar="root ::= 'a'"), 400, "unsupported_parameter",
     "guided_grammar"),
    (COMPLETIONS, completion(structured_outputs={"choice": ["a"]}), 400,
     "unsupported_parameter", "structured_outputs"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "unsupported_parameter", "tools"),
    (CHAT, chat(tool_choice="auto"), 400, "unsupported_parameter", "tool_choice"),
    (CHAT, chat(functions=[{"name": "f"}]), 400, "unsupported_parameter", "functions"),
    (CHAT, chat(function_call="auto"), 400, "unsupported_parameter", "function_call"),
    (CHAT, chat(echo=True), 400, "unsupported_parameter", "echo"),
    (CHAT, chat(best_of=2), 400, "unsupported_parameter", "best_of"),
    (COMPLETIONS, completion(prompt_logprobs=1), 400, "unsupported_parameter",
     "prompt_logprobs"),
    (COMPLETIONS, completion(include_stop_str_in_output=True), 400, "unsupported_parameter",
     "include_stop_str_in_output"),
    (CHAT, chat(chat_template_kwargs={"enable_thinking": False}), 400,
     "unsupported_parameter", "chat_template_kwargs"),
    (CHAT, chat(continue_final_message=True), 400, "unsupported_parameter",
     "continue_final_message"),
    (CHAT, chat(add_generation_prompt=False), 400, "unsupported_parameter",
     "add_generation_prompt"),
    (COMPLETIONS, completion(logit_bias={"5": 1.0}), 400, "unsupported_parameter",
     "logit_bias"),
    (COMPLETIONS, completion(n=2), 400, "unsupported_parameter", "n"),
    (CHAT, chat(stream_options={"continuous_usage_stats": True}), 400, "invalid_parameter",
     "stream_options.continuous_usage_stats"),
    # This server schedules fcfs: a priority would be ignored, so it is refused.
    (COMPLETIONS, completion(priority=1), 400, "invalid_parameter", "priority"),
    (CHAT, chat(priority=-3), 400, "invalid_parameter", "priority"),
    # A deadline no request can meet.
    (COMPLETIONS, completion(timeout=1e-300), 400, "invalid_parameter", "timeout"),
    (CHAT, chat(timeout=MIN_TIMEOUT_S / 2), 400, "invalid_parameter", "timeout"),
    # `param` names the field the client sent.
    (CHAT, chat(logprobs=True, top_logprobs=100), 400, "invalid_parameter", "top_logprobs"),
    (COMPLETIONS, completion(logprobs=100), 400, "invalid_parameter", "logprobs"),
    (CHAT, chat(max_completion_tokens=MAX_MODEL_LEN), 400, "invalid_parameter",
     "max_completion_tokens"),
    # Malformed bodies.
    (COMPLETIONS, "{not json", 400, "invalid_json", None),
    (COMPLETIONS, "[1, 2]", 400, "invalid_parameter", None),
]


def send(url: str, path: str, body: dict | str) -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(url + path, content=body.encode(),
                          headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(url + path, json=body, timeout=60)


def assert_openai_error(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert SNAKE.match(error["code"]) and SNAKE.match(error["type"]), error
    assert error["param"] is None or isinstance(error["param"], str)
    return error


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), BAD,
                         ids=[f"{i}-{row[4]}" for i, row in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_code_and_field(gateway, path, body, status, code, param):
    streams = (False, True) if isinstance(body, dict) and "stream" not in body else (False,)
    for stream in streams:
        sent = {**body, "stream": True} if stream else body
        response = send(gateway.url, path, sent)
        assert response.status_code == status, response.text[:500]
        error = assert_openai_error(response)
        assert (error["code"], error["param"]) == (code, param), error
        assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("path", "body"), [
    (COMPLETIONS, completion(seed=2**64 - 1)),  # the range's ends are accepted
    (COMPLETIONS, completion(seed=-(2**63))),
    (COMPLETIONS, completion(prompt=[[5, 6]], user="u-1", priority=0, timeout=MIN_TIMEOUT_S * 50)),
    # Values that ask for nothing kvrelay lacks are accepted (clients send defaults).
    (COMPLETIONS, completion(echo=False, best_of=1, n=1, logit_bias={}, suffix="",
                             include_stop_str_in_output=False, response_format={"type": "text"},
                             add_special_tokens=True)),
    (CHAT, chat(tools=[], tool_choice="none", add_generation_prompt=True, echo=False,
                continue_final_message=False, chat_template_kwargs={},
                stream_options={"include_usage": True, "continuous_usage_stats": False})),
    (CHAT, chat(messages=[{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "again", "name": "bob"}])),
])
def test_good_input_at_the_edges_is_served(gateway, path, body):
    response = post(gateway, path, body)
    assert response.status_code == 200, response.text


def test_error_codes_are_snake_case_and_models_carry_root_and_parent(gateway):
    missing = httpx.post(gateway.url + "/v1/embeddings", json={})
    assert (missing.status_code, assert_openai_error(missing)["code"]) == (404, "not_found")
    wrong = httpx.get(gateway.url + COMPLETIONS)
    assert (wrong.status_code, assert_openai_error(wrong)["code"]) == (405, "method_not_allowed")
    [model] = httpx.get(gateway.url + "/v1/models").json()["data"]
    assert (model["id"], model["root"], model["parent"]) == ("tiny", "tiny", None)
