"""The request body limit (router/body_limit.py) over real HTTP: a body over the limit gets an
OpenAI-shaped 413 before anything parses it, whether it declares its length or is a chunked
upload; bodies within it reach the app whole; the gateway's default refuses a 5 MB prompt."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Request

from router.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodyLimit
from tests.served_app import serve

LIMIT = 1000


def echo_app(max_bytes: int) -> tuple[FastAPI, list[int]]:
    """An app that answers with the length of the body it got, behind the limit."""
    app = FastAPI()
    seen: list[int] = []

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        seen.append(len(await request.body()))
        return {"bytes": seen[-1]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    return app, seen


@pytest.fixture(scope="module")
def echo_url():
    app, seen = echo_app(LIMIT)
    with serve(app) as url:
        yield url, seen


def chunks(total: int, size: int = 300):
    """A body without Content-Length: httpx sends it chunked."""
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


def test_body_over_content_length_limit_is_413_unread(echo_url):
    url, seen = echo_url
    before = len(seen)
    response = httpx.post(f"{url}/echo", content=b"x" * (LIMIT + 1))
    assert response.status_code == 413
    error = response.json()["error"]
    assert f"{LIMIT + 1} bytes" in error["message"] and str(LIMIT) in error["message"]
    assert "--max-request-bytes" in error["message"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert len(seen) == before  # the app never ran


def test_chunked_body_over_limit_is_413(echo_url):
    url, seen = echo_url
    before = len(seen)
    response = httpx.post(f"{url}/echo", content=chunks(LIMIT * 3))
    assert response.status_code == 413
    assert str(LIMIT) in response.json()["error"]["message"]
    assert len(seen) == before


@pytest.mark.parametrize("size", [0, 1, LIMIT])
def test_bodies_within_limit_reach_the_app_whole(echo_url, size):
    url, _ = echo_url
    assert httpx.post(f"{url}/echo", content=b"x" * size).json() == {"bytes": size}
    assert httpx.post(f"{url}/echo", content=chunks(size)).json() == {"bytes": size}
    assert httpx.get(f"{url}/health").status_code == 200


def test_limit_zero_is_no_limit():
    app, _ = echo_app(0)
    with serve(app) as url:
        assert httpx.post(f"{url}/echo", content=b"x" * 5000).json() == {"bytes": 5000}
    with pytest.raises(ValueError):
        BodyLimit(app, max_bytes=-1)


def test_gateway_refuses_a_5mb_prompt_by_default(gateway):
    """The real gateway (tests/router/conftest.py) at its default limit of 4 MiB."""
    prompt = "hello " * (5_000_000 // 6)
    response = httpx.post(f"{gateway.url}/v1/completions", timeout=30,
                          json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
    assert response.status_code == 413, response.text
    assert str(DEFAULT_MAX_REQUEST_BYTES) in response.json()["error"]["message"]
    ok = httpx.post(f"{gateway.url}/v1/completions", timeout=30,
                    json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
