"""HealthWatch (router/health_watch.py): /health answered from memory, at most one refresh in
flight, errors kept until the next answer."""

from __future__ import annotations

import asyncio

import pytest

from router.health_watch import HealthWatch


class SlowRouter:
    """A health call that takes `delay_s` and answers (or raises) what it is told."""

    def __init__(self, delay_s: float = 0.05):
        self.delay_s = delay_s
        self.calls = 0
        self.answer: dict | Exception = {"state": 0}

    async def health(self) -> dict:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if isinstance(self.answer, Exception):
            raise self.answer
        return dict(self.answer)


def test_probes_wait_only_for_the_first_answer_then_never():
    async def main():
        router = SlowRouter(delay_s=0.05)
        watch = HealthWatch(router.health, max_age_s=0.2)
        assert await watch.get() == {"state": 0}  # the first probe waits
        router.answer = {"state": 1}
        loop = asyncio.get_running_loop()
        for _ in range(20):  # fresh: no call to the router
            assert await watch.get() == {"state": 0}
        assert router.calls == 1
        await asyncio.sleep(0.25)
        start = loop.time()
        answers = [await watch.get() for _ in range(5)]  # stale: answered at once
        assert loop.time() - start < 0.03 and answers == [{"state": 0}] * 5
        await asyncio.sleep(0)  # the refresh task starts
        assert router.calls == 2  # one refresh for all of them
        await asyncio.sleep(0.1)
        assert await watch.get() == {"state": 1}

    asyncio.run(main())


def test_an_error_is_raised_until_the_next_answer():
    async def main():
        router = SlowRouter(delay_s=0.0)
        watch = HealthWatch(router.health, max_age_s=0.0)
        router.answer = RuntimeError("router down")
        with pytest.raises(RuntimeError, match="router down"):
            await watch.get()
        router.answer = {"state": 2}
        with pytest.raises(RuntimeError):  # the last word until the refresh it starts ends
            await watch.get()
        await asyncio.sleep(0.01)
        assert await watch.get() == {"state": 2}

    asyncio.run(main())
