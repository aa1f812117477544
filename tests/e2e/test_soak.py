"""One `kvrelay serve` (1P+1D, tiny model, body limit raised to 8 MiB) under load:

- /health answers within 100 ms while a 5 MB prompt is tokenized (off the event loop), and
  the gateway gives the memory of such prompts back;
- a soak (4 streams, mixed prompt lengths up to 1,500 tokens, one in ten cancelled) leaves
  the RSS of every process flat: gateway, Router, prefill and decode workers, GCS, raylet
  (tests/e2e/soak_load.py says how growth is judged). 60 s by default; longer with
  KVRELAY_SOAK_SECONDS=300;
- then an idle SIGINT to the whole process group stops everything within 5 s.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.e2e.served_process import ServeProcess, tiny_serve_args
from tests.e2e.soak_load import soak, sustained_growth
from tests.e2e.test_shutdown import assert_nothing_left

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.environ.get("KVRELAY_SOAK_SECONDS", "60"))
MIB = 1 << 20


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("soak") / "serve.log"
    server = ServeProcess(tiny_serve_args(tiny_model_dir, "--max-request-bytes",
                                          str(8 * MIB)), log)
    yield server
    server.close()


def health_latencies(url: str, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    """(start, seconds) of a /health call every 20 ms until `stop`."""
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            start = time.monotonic()
            assert client.get("/health").status_code == 200
            out.append((start, time.monotonic() - start))
            time.sleep(0.02)


def gateway_rss(server: ServeProcess) -> int:
    return server.rss_bytes()[f"cluster.cli {server.pid}"]


def test_health_within_100ms_while_a_5mb_prompt_is_tokenized(server):
    prompt = "the quick brown fox jumps over the lazy dog " * (5_000_000 // 44)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2}
    latencies: list[tuple[float, float]] = []
    stop = threading.Event()
    poller = threading.Thread(target=health_latencies, args=(server.url, stop, latencies))
    rss_before = gateway_rss(server)
    poller.start()
    try:
        time.sleep(0.5)
        windows = []
        for _ in range(2):
            start = time.monotonic()
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
            windows.append((start, time.monotonic()))
            # Tokenized to ~2M tokens, then refused for the context length.
            assert response.status_code == 400 and "prompt" in response.text, response.text
    finally:
        stop.set()
        poller.join(30)
    during = sorted(s for t, s in latencies if any(a <= t <= b for a, b in windows))
    assert len(during) >= 20, f"only {len(during)} /health calls during the big requests"
    p99 = during[int(len(during) * 0.99)]
    print(f"/health during 5 MB prompts: {len(during)} calls, median "
          f"{during[len(during) // 2] * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max "
          f"{during[-1] * 1e3:.1f} ms")
    # The event loop never waits on the prompt (it used to stall 6-9 s). On two cores shared
    # with the workers and other test runs, one call in a hundred may still be descheduled
    # (a 214 ms outlier at load 10, with a median of 4 ms), hence p99 and a looser maximum.
    assert p99 < 0.1 and during[-1] < 0.5, f"p99 {p99 * 1e3:.0f} ms, max {during[-1] * 1e3:.0f}"
    grown = (gateway_rss(server) - rss_before) / MIB
    print(f"gateway RSS after two 5 MB prompts: {grown:+.0f} MiB")
    assert grown < 150


def test_soak_leaves_every_process_rss_flat(server):
    """Flat: no growth from the middle third of the soak to the last (beyond 16 MiB or 5%),
    and no more than 1.5x (or +64 MiB) the idle RSS before it, which is what the prefill
    worker's arenas broke (~300 -> ~790 MiB within the first 20 s, flat after that)."""
    idle = server.rss_bytes()
    result = soak(server.url, server.rss_bytes, SOAK_SECONDS)
    assert not result.errors, result.errors[:5]
    assert result.ok >= SOAK_SECONDS and result.cancelled >= 1, (result.ok, result.cancelled)
    growth = sustained_growth(result.samples)
    assert any(name.startswith("ray::WorkerActor") for name in growth), list(growth)
    print(f"soak: {result.ok} requests, {result.cancelled} cancelled")
    grown = {}
    for name, (middle, last) in sorted(growth.items()):
        start = idle.get(name, middle)
        print(f"{name:32s} {start / MIB:7.1f} -> {middle / MIB:7.1f} -> {last / MIB:7.1f} MiB")
        if last - middle > max(16 * MIB, middle // 20) or last > max(start * 3 // 2,
                                                                     start + 64 * MIB):
            grown[name] = f"{start / MIB:.0f} -> {middle / MIB:.0f} -> {last / MIB:.0f} MiB"
    assert not grown, grown


def test_idle_sigint_to_the_group_stops_everything_within_5s(server):
    server.send(signal.SIGINT, group=True)
    assert server.wait_exit(5) < 5 and server.process.returncode == 0, server.log()[-2000:]
    assert_nothing_left(server)
