"""The cluster's health as the gateway last heard it, so /health answers from memory.

Asking the Router is a Ray round trip through several processes; on a busy machine (a huge
prompt being tokenized, two cores shared with the workers) that took 100-220 ms, while the
event loop itself answered within ~60 ms. `HealthWatch.get()` returns the last answer (or
the error it raised) while it is younger than `max_age_s`; an older one is still returned at
once while one refresh runs in the background, so a probe never waits on the Router and the
Router gets at most about one health call per `max_age_s`, however often probes come. Only the
very first call waits for an answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


class HealthWatch:
    def __init__(self, ask: Callable[[], Awaitable[dict[str, Any]]], max_age_s: float = 1.0):
        self._ask = ask
        self.max_age_s = max_age_s
        self._answer: dict[str, Any] | None = None
        self._error: Exception | None = None
        self._at = -float("inf")
        self._refresh: asyncio.Task | None = None

    async def get(self) -> dict[str, Any]:
        """The last health answer; raises the error the last ask raised instead."""
        if self._refresh is None and time.monotonic() - self._at > self.max_age_s:
            self._refresh = asyncio.ensure_future(self._ask_now())
        if self._answer is None and self._error is None:
            await asyncio.shield(self._refresh)
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer

    async def _ask_now(self) -> None:
        try:
            self._answer, self._error = await self._ask(), None
        except Exception as exc:  # kept and raised to every caller until the next answer
            self._error = exc
        finally:
            self._at = time.monotonic()
            self._refresh = None
