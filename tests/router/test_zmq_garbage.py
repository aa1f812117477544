"""The router's ZMQ receivers (router/worker_news.py, router/output_receiver.py) never leave
a context for the garbage collector to terminate: a context collected while its socket is
still open blocks the collecting thread for good in zmq_ctx_term (the socket's weak reference
is cleared before the context's finalizer runs). A router that was never closed (a test that
failed half-way) once hung the whole suite in a later, unrelated test when a collection
reached it."""

from __future__ import annotations

import gc
import threading

from router.worker_news import NewsReceiver


def _collects_within(timeout_s: float) -> bool:
    done = threading.Event()
    threading.Thread(target=lambda: (gc.collect(), done.set()), daemon=True).start()
    return done.wait(timeout_s)


def test_an_unclosed_news_receiver_is_garbage_without_blocking_the_collector():
    def abandon() -> None:
        receiver = NewsReceiver("127.0.0.1")
        receiver.bind()
        receiver.cycle = receiver  # only the cycle collector frees it

    for _ in range(4):
        abandon()
    assert _collects_within(20), "gc.collect() blocked in zmq_ctx_term"
