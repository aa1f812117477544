"""`kvrelay serve` stopped with streams in flight, by SIGTERM to the serve process and to its
whole process group (Ray's GCS and raylet included): new requests get 503 at once, every
stream ends with [DONE] (after its last token, or an error event once the drain timeout cut
it), the server exits within the drain timeout + 5 s, and no process it started is left."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

from tests.e2e.served_process import ServeProcess, tiny_serve_args

pytestmark = pytest.mark.slow

STREAMS = 4


async def _stream(client: httpx.AsyncClient, max_tokens: int, started: asyncio.Event) -> list:
    """The SSE payloads of one streamed completion (JSON-decoded; '[DONE]' as is)."""
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    payloads: list = []
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    payloads.append(data if data == "[DONE]" else json.loads(data))
                    started.set()
    finally:
        started.set()
    return payloads


def stop_with_streams(model_dir, log_path, drain_timeout_s: float, group: bool,
                      max_tokens: int) -> tuple[list, float]:
    """Serves, starts the streams, sends SIGTERM once each has begun; checks that a request
    sent 0.5 s later gets 503, that serve exits with 0 and leaves no process behind. Returns
    the streams' payloads and the seconds from the signal to the exit."""
    server = ServeProcess(tiny_serve_args(model_dir, "--drain-timeout", str(drain_timeout_s)),
                          log_path)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            started = [asyncio.Event() for _ in range(STREAMS)]
            streams = [asyncio.ensure_future(_stream(client, max_tokens, s)) for s in started]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 60)
            server.send(signal.SIGTERM, group)
            signalled = time.monotonic()
            await asyncio.sleep(0.5)
            late = await client.post("/v1/completions", json={"model": "tiny", "prompt": [5],
                                                               "max_tokens": 1})
            assert late.status_code == 503, late.text
            return await asyncio.gather(*streams), signalled

    try:
        payloads, signalled = asyncio.run(main())
        server.wait_exit(120)
        took = time.monotonic() - signalled
        assert server.process.returncode == 0, server.log()[-2000:]
        assert_nothing_left(server)
    finally:
        server.close()
    return payloads, took


def assert_nothing_left(server: ServeProcess, timeout_s: float = 5.0) -> None:
    """Every process of the server's session (Ray's agents and workers too) is gone."""
    deadline = time.monotonic() + timeout_s
    while (left := server.processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"left behind: {left}"


def test_sigterm_to_the_process_drains_streams_to_their_end(tiny_model_dir, tmp_path):
    # Streams long enough to outlast the 0.5 s before the late request: with 200 tokens the
    # drain could end first (a loaded CI run, 2026-11-28), and the server with it.
    payloads, took = stop_with_streams(tiny_model_dir, tmp_path / "serve.log", 60,
                                       group=False, max_tokens=1000)
    for stream in payloads:
        assert stream[-1] == "[DONE]", stream[-3:]
        assert stream[-2]["choices"][0]["finish_reason"] == "length", stream[-3:]
    assert took < 60 + 5


def test_sigterm_to_the_process_group_cuts_streams_at_the_drain_timeout(tiny_model_dir,
                                                                         tmp_path):
    """Streams far longer than the 2 s drain: each ends with an error event and [DONE]."""
    payloads, took = stop_with_streams(tiny_model_dir, tmp_path / "serve.log", 2.0,
                                       group=True, max_tokens=2000)
    for stream in payloads:
        assert stream[-1] == "[DONE]", stream[-3:]
        assert "shutting down" in stream[-2]["error"]["message"], stream[-3:]
        assert len(stream) > 3  # tokens kept flowing during the drain
    assert 2.0 <= took < 2.0 + 5
