"""Fixtures of the load tester's tests: a real streaming OpenAI-compatible server per module."""

from __future__ import annotations

import pytest
from mini_openai_server import Behaviour, MiniOpenAIServer


@pytest.fixture(scope="module")
def openai_server():
    with MiniOpenAIServer(Behaviour()) as server:
        yield server


@pytest.fixture(scope="module")
def openai_server_without_usage():
    with MiniOpenAIServer(Behaviour(send_usage=False)) as server:
        yield server
