"""The one thread that drives a worker's engine, and how other threads reach it.

The engine is not thread-safe, so every engine call runs in this thread: other threads (Ray's
actor threads, KV-transfer callbacks, a test) post closures to its inbox, `call` when they
need the answer (waiting on a Future), `call_soon` when they do not. Between commands the
thread runs the worker's `turn` (one engine step and its outputs) while `busy()` says there is
work; idle, it sleeps on the inbox, so a command wakes it at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

# How long the idle loop waits on its inbox before checking `running` again.
_IDLE_WAIT_S = 0.05
# A command that takes longer than this in the loop thread is a bug (e.g. a deadlock).
_CALL_TIMEOUT_S = 60.0


class EngineLoop:
    """Starts the thread at construction; `stop` ends it after the current turn."""

    def __init__(self, name: str, turn: Callable[[], None], busy: Callable[[], bool]):
        self._turn = turn
        self._busy = busy
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._running = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._running = False
        self._thread.join(timeout=timeout_s)

    def call(self, fn: Callable[[], Any], timeout: float = _CALL_TIMEOUT_S) -> Any:
        """Runs `fn` in the loop thread and returns its result (or raises its error)."""
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, not swallowed
                future.set_exception(exc)

        self._inbox.put(run)
        return future.result(timeout=timeout)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Runs `fn` in the loop thread later; an error is logged, never kills the loop."""

        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("command failed in %s", self._thread.name)

        self._inbox.put(run)

    def on_loop(self, fn: Callable[[], None]) -> None:
        """Runs `fn` now if this is the loop thread, else soon in it (`call_soon`)."""
        if threading.current_thread() is self._thread:
            fn()
        else:
            self.call_soon(fn)

    def _run(self) -> None:
        while self._running:
            self._drain_inbox(block=not self._busy())
            self._turn()

    def _drain_inbox(self, block: bool) -> None:
        try:
            fn = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn()
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return
