"""The gateway over real HTTP (uvicorn on a free port) in front of a real engine worker.

See conftest.py: RouterCore + in-process ColocatedWorker (tiny checkpoint), chunks over ZMQ.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from cluster.metrics import GatewayMetrics
from router.gateway import create_app
from router.router_core import RouterConfig, RouterCore
from tests.router.conftest import (
    MAX_MODEL_LEN,
    NUM_BLOCKS,
    CoreBackend,
    ScriptedBackend,
    engine_config,
    post,
    serve,
    served_gateway,
    sse_payloads,
    stop_core,
)
from workers.engine.engine import LLMEngine
from workers.engine.sampling_params import SamplingParams
from workers.protocol import OutputChunk
from workers.text.tokenizer import Tokenizer

PROMPT = "The quick brown fox jumps over the lazy dog"
GREEDY = {"model": "tiny", "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def offline(tiny_model_dir) -> LLMEngine:
    return LLMEngine(engine_config(tiny_model_dir))


def test_greedy_completion_equals_offline_engine_generate(gateway, offline):
    response = post(gateway, "/v1/completions", {**GREEDY, "prompt": PROMPT, "max_tokens": 12})
    assert response.status_code == 200, response.text
    data = response.json()
    expected = offline.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0,
                                                         ignore_eos=True))[0]
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    assert data["choices"][0]["text"] == expected.text
    assert data["choices"][0]["finish_reason"] == "length"
    num_prompt = len(gateway.tokenizer.encode(PROMPT))
    usage = dict(data["usage"])
    assert usage.pop("prompt_tokens_details").keys() == {"cached_tokens"}
    assert usage == {"prompt_tokens": num_prompt, "completion_tokens": 12,
                     "total_tokens": num_prompt + 12}
    # The same prompt as token ids gives the same text, its full blocks from the cache.
    ids = gateway.tokenizer.encode(PROMPT)
    again = post(gateway, "/v1/completions", {**GREEDY, "prompt": ids, "max_tokens": 12})
    assert again.json()["choices"][0]["text"] == expected.text
    block_size = offline.config.cache.block_size
    cached = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (num_prompt - 1) // block_size * block_size > 0


def test_concurrent_requests_each_get_their_own_greedy_text(gateway, offline):
    prompts = [f"Prompt number {i} says" + " hello" * i for i in range(8)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [out.text for out in offline.generate(prompts, params)]

    def ask(i: int) -> str:
        body = {**GREEDY, "prompt": prompts[i], "max_tokens": 8, "stream": i % 2 == 1}
        response = post(gateway, "/v1/completions", body)
        if i % 2 == 0:
            return response.json()["choices"][0]["text"]
        return "".join(p["choices"][0]["text"] for p in sse_payloads(response.text)[:-1])

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == expected


def test_stream_is_openai_chunks_ending_done_with_usage(gateway):
    body = {**GREEDY, "prompt": PROMPT, "max_tokens": 10}
    unary = post(gateway, "/v1/completions", body).json()
    response = post(gateway, "/v1/completions",
                    {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks, usage_chunk = payloads[:-2], payloads[-2]
    assert len({c["id"] for c in payloads[:-1]}) == 1
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == unary["choices"][0]["text"]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == unary["usage"]


def test_chat_unary_and_stream_agree(gateway):
    body = {**GREEDY, "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text",
                                                                 "text": "Hello there"}]}],
            "max_completion_tokens": 8}
    unary = post(gateway, "/v1/chat/completions", body).json()
    assert unary["id"].startswith("chatcmpl-") and unary["object"] == "chat.completion"
    message = unary["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert unary["usage"]["completion_tokens"] == 8
    template = gateway.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    bos = gateway.tokenizer.bos_token
    ids = gateway.tokenizer.encode(template, add_special_tokens=not template.startswith(bos))
    assert unary["usage"]["prompt_tokens"] == len(ids)
    stream = post(gateway, "/v1/chat/completions",
                  {**body, "stream": True, "stream_options": {"include_usage": True}})
    payloads = sse_payloads(stream.text)
    assert payloads[-1] == "[DONE]"
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    chunks = [p for p in payloads[1:-1] if p["choices"]]
    assert all(p["object"] == "chat.completion.chunk" for p in chunks)
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in chunks)
    assert text == message["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # The same tokens again: equal usage, except that the prompt now came from the cache.
    streamed = payloads[-2]["usage"]
    assert streamed["prompt_tokens_details"]["cached_tokens"] > 0
    assert {**streamed, "prompt_tokens_details": None} == \
        {**unary["usage"], "prompt_tokens_details": None}


def test_logprobs_in_completion_and_chat_formats(gateway):
    completion = post(gateway, "/v1/completions",
                      {**GREEDY, "prompt": PROMPT, "max_tokens": 5, "logprobs": 2}).json()
    logprobs = completion["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 5
    assert "".join(logprobs["tokens"]) == completion["choices"][0]["text"]
    for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert 1 <= len(top) <= 2 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the top token
    assert logprobs["text_offset"][0] == 0
    chat = post(gateway, "/v1/chat/completions",
                {**GREEDY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                 "logprobs": True, "top_logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    assert all(item["bytes"] == list(item["token"].encode()) for item in content)
    assert all(len(item["top_logprobs"]) == 2 for item in content)


def test_stop_string_seed_and_simple_generate(gateway):
    greedy = post(gateway, "/v1/completions",
                  {**GREEDY, "prompt": PROMPT, "max_tokens": 16}).json()["choices"][0]["text"]
    stop = greedy[6:9]
    cut = post(gateway, "/v1/completions",
               {**GREEDY, "prompt": PROMPT, "max_tokens": 16, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == greedy[: greedy.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    sampled = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 7,
               "ignore_eos": True}
    first = post(gateway, "/v1/completions", sampled).json()["choices"][0]["text"]
    assert post(gateway, "/v1/completions", sampled).json()["choices"][0]["text"] == first
    simple = post(gateway, "/v1/generate",
                  {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
    data = simple.json()
    assert data["text"] == greedy and data["tokens_generated"] == 16
    assert data["id"].startswith("gen-") and data["latency_ms"] > 0
    assert data["tokens_per_second"] > 0


TOO_LONG = "word " * (MAX_MODEL_LEN + 10)


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {"prompt": []}, 400, "prompt"),
        ("/v1/completions", {"prompt": TOO_LONG}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [10**6, 5]}, 400, "prompt"),  # refused by the worker
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "top_logprobs": 2}, 400, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]},
         400, "messages"),
        ("/v1/generate", {"prompt": "hi", "stream": True}, 400, "stream"),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_field(gateway, path, body, status, param):
    for stream in (False, True):
        if stream and path == "/v1/generate":
            continue
        response = post(gateway, path, {**body, "stream": body.get("stream", stream)})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and error["message"]
    if body.get("prompt") == TOO_LONG or body.get("max_tokens") == MAX_MODEL_LEN:
        assert str(MAX_MODEL_LEN - 1) in error["message"] or str(MAX_MODEL_LEN) in error["message"]


def test_malformed_json_is_400_not_422_and_unknown_paths_are_openai_errors(gateway):
    response = httpx.post(gateway.url + "/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.post(gateway.url + "/v1/embeddings", json={})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong_method = httpx.get(gateway.url + "/v1/completions")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"]


def test_deadline_ends_request_with_504_and_frees_blocks(gateway):
    response = post(gateway, "/v1/completions",
                    {**GREEDY, "prompt": "hi", "max_tokens": 240, "timeout": 0.1})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"
    assert gateway.wait_all_blocks_free() == NUM_BLOCKS


def closed_by_client(served) -> int:
    return served.metrics.snapshot([])["requests_by_status"].get("499", 0)


def assert_aborted_everywhere(gateway, before: set[str], closed: int) -> None:
    """After a client left: its blocks are free, the router forgot the request within 5 s,
    and it counts as closed by the client."""
    assert gateway.wait_all_blocks_free() == NUM_BLOCKS
    deadline = time.monotonic() + 5
    while set(gateway.core.requests) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(gateway.core.requests) - before
    assert closed_by_client(gateway) == closed + 1


def test_disconnect_mid_stream_aborts_and_frees_blocks(gateway):
    body = {**GREEDY, "prompt": "hi", "max_tokens": 240, "stream": True}
    # The tiny model can finish all 240 tokens before the client has read 3 events (about
    # one run in five on a loaded machine): such an attempt proves nothing, so try again.
    for _ in range(5):
        before, closed = set(gateway.core.requests), closed_by_client(gateway)
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", gateway.url + "/v1/completions", json=body) as response:
                events = 0
                for line in response.iter_lines():
                    events += line.startswith("data: ")
                    if events == 3:
                        break
                held = gateway.free_blocks() < NUM_BLOCKS  # still running: mid-stream
        if held:
            break
        assert gateway.wait_all_blocks_free() == NUM_BLOCKS
    assert held, "every attempt finished before the client left"
    assert_aborted_everywhere(gateway, before, closed)


def test_disconnect_while_waiting_for_unary_response_aborts(gateway):
    before, closed = set(gateway.core.requests), closed_by_client(gateway)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/completions",
                   json={**GREEDY, "prompt": "hi", "max_tokens": 240},
                   timeout=httpx.Timeout(30, read=0.3))
    assert_aborted_everywhere(gateway, before, closed)


def test_over_the_in_flight_limit_is_429_with_retry_after(colocated_worker, tiny_model_dir):
    with served_gateway(colocated_worker, tiny_model_dir, max_in_flight=1) as served:
        body = {**GREEDY, "prompt": "hi", "max_tokens": 240}
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: post(served, "/v1/completions", body), range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses[0] == 200 and statuses[-1] == 429, statuses
        for refused in (r for r in responses if r.status_code == 429):
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["type"] == "rate_limit_error"
        assert served.wait_all_blocks_free() == NUM_BLOCKS
        after = post(served, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert after.status_code == 200


def test_no_ready_worker_is_503_on_health_and_requests(tiny_model_dir):
    core = RouterCore(RouterConfig())
    app = create_app(CoreBackend(core), Tokenizer(tiny_model_dir), "tiny", MAX_MODEL_LEN)
    try:
        with serve(app) as url:
            assert httpx.get(url + "/health").status_code == 503
            response = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "no_ready_worker"
            assert int(response.headers["retry-after"]) >= 1
    finally:
        stop_core(core)


def test_models_health_and_metrics(gateway):
    post(gateway, "/v1/completions", {**GREEDY, "prompt": PROMPT, "max_tokens": 4})
    post(gateway, "/v1/completions", {"prompt": "hi", "temperature": -1})
    models = httpx.get(gateway.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    health = httpx.get(gateway.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = httpx.get(gateway.url + "/metrics").text
    assert 'kvrelay_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'kvrelay_requests_total{endpoint="/v1/completions",status="400"}' in text
    assert 'kvrelay_worker_free_blocks{worker="gw-colocated-0"}' in text
    assert 'kvrelay_worker_kv_usage{worker="gw-colocated-0"}' in text
    assert 'kvrelay_worker_queue_depth{worker="gw-colocated-0"}' in text
    for phase in ("queue", "prefill", "decode"):
        assert f'kvrelay_request_phase_seconds_count{{phase="{phase}"}}' in text
    ttft_count = next(line for line in text.splitlines()
                      if line.startswith("kvrelay_time_to_first_token_seconds_count"))
    assert float(ttft_count.split()[-1]) >= 1
    snapshot = httpx.get(gateway.url + "/v1/metrics").json()
    assert snapshot["requests_by_status"]["200"] >= 1
    assert snapshot["requests_by_status"].get("500", 0) == 0
    assert snapshot["mean_ttft_s"] > 0 and snapshot["generation_tokens"] >= 4
    assert snapshot["workers"][0]["worker_id"] == "gw-colocated-0"
    assert snapshot["gateway"]["in_flight"] == 0 and snapshot["gateway"]["chunks_received"] > 0


@contextmanager
def scripted(tiny_model_dir, script: list[OutputChunk]):
    backend = ScriptedBackend(script)
    app = create_app(backend, Tokenizer(tiny_model_dir), "tiny", MAX_MODEL_LEN)
    try:
        with serve(app) as url:
            yield url, backend
    finally:
        backend.close()


def test_worker_stalling_mid_stream_ends_with_timeout_event_and_abort(tiny_model_dir):
    with scripted(tiny_model_dir, [OutputChunk("", [5], text_delta="Hel")]) as (url, backend):
        response = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}], "stream": True, "timeout": 0.5})
        payloads = sse_payloads(response.text)
        assert response.status_code == 200 and payloads[-1] == "[DONE]"
        assert payloads[1]["choices"][0]["delta"] == {"content": "Hel"}
        assert payloads[-2]["error"]["code"] == "request_timeout"
        unary = httpx.post(url + "/v1/completions", json={"prompt": "hi", "timeout": 0.3})
        assert unary.status_code == 504
        deadline = time.monotonic() + 5
        while len(backend.aborted) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.aborted == backend.submitted  # both aborted, nothing left running


@pytest.mark.parametrize(("error_type", "status"), [("RuntimeError", 500), ("WorkerLost", 503),
                                                    ("PromptTooLong", 400)])
def test_worker_error_chunks_map_to_their_status(tiny_model_dir, error_type, status):
    """A typed error's message reaches the client; an untyped one (whose text may carry
    pids or addresses) becomes a 500 naming only the request id."""
    failure = OutputChunk("", finished=True, finish_reason="error", error="it broke",
                          error_type=error_type)

    def check(error: dict, request_id: str) -> None:
        if status == 500:
            assert "it broke" not in error["message"] and request_id in error["message"]
            assert error["code"] == "internal_error"
        else:
            assert error["message"].endswith("it broke")

    with scripted(tiny_model_dir, [failure]) as (url, backend):
        unary = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
        assert unary.status_code == status
        check(unary.json()["error"], backend.submitted[0])
    late = [OutputChunk("", [5], text_delta="He"), failure]
    with scripted(tiny_model_dir, late) as (url, backend):
        stream = httpx.post(url + "/v1/completions", json={"prompt": "hi", "stream": True})
        payloads = sse_payloads(stream.text)
        assert payloads[0]["choices"][0]["text"] == "He" and payloads[-1] == "[DONE]"
        check(payloads[-2]["error"], backend.submitted[0])
        assert backend.aborted == []  # the worker ended it; nothing to abort


def test_phase_split_and_kv_transfer_metrics_come_from_the_final_chunk(tiny_model_dir):
    timings = {"queue": 0.01, "prefill": 0.1, "kv_ready_delay": 0.2, "transfer_wire": 0.05,
               "transfer_bytes": 2**20, "decode": 0.3}
    script = [OutputChunk("", [5], text_delta="a"),
              OutputChunk("", [6], text_delta="b", finished=True, finish_reason="length",
                          timings=timings)]
    backend = ScriptedBackend(script)
    metrics = GatewayMetrics()
    app = create_app(backend, Tokenizer(tiny_model_dir), "tiny", MAX_MODEL_LEN, metrics=metrics)
    try:
        with serve(app) as url:
            response = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
            assert response.json()["choices"][0]["text"] == "ab"
            text = httpx.get(url + "/metrics").text
            snapshot = httpx.get(url + "/v1/metrics").json()
    finally:
        backend.close()
    assert "kvrelay_kv_transfer_bytes_total 1.048576e+06" in text
    assert "kvrelay_kv_transfer_seconds_total 0.05" in text
    for phase, seconds in (("queue", 0.01), ("prefill", 0.1), ("kv_ready_delay", 0.2),
                           ("decode", 0.3)):
        assert f'kvrelay_request_phase_seconds_sum{{phase="{phase}"}} {seconds}' in text
    assert snapshot["kv_transfer_bytes"] == 2**20 and snapshot["generation_tokens"] == 2
    assert snapshot["requests_by_status"] == {"200": 1}
