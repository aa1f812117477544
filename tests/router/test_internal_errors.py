"""No internals in error messages: what fails unexpectedly (the engine, Ray, a bug) reaches the
client as a 500 naming the request id only, while the log keeps pids, addresses and actor ids.

Each boundary where that mapping happens is tested: the worker actor, the Router's handle on
a worker, the gateway's handle on the Router, a worker's engine, and the gateway itself.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray import exceptions as ray_errors

from router.gateway import create_app
from router.router import _unwrap
from router.worker_handle import raise_typed
from tests.router.conftest import MAX_MODEL_LEN, NUM_BLOCKS, ScriptedBackend, post, serve
from tests.router.test_bad_input import assert_openai_error
from workers.actors.remote_errors import RemoteError, to_wire
from workers.actors.worker_actor import WorkerActor
from workers.errors import InternalError, NoCapacity, RouterUnavailable
from workers.text.tokenizer import Tokenizer

LEAK = "pid=4242, ip=10.1.2.3, actor_id=deadbeefcafe"
SECRETS = ("pid=4242", "10.1.2.3", "deadbeefcafe")
"""What must never reach a client (a bare '4242' would also match a random request id)."""


def assert_no_secrets(text: str) -> None:
    assert not any(secret in text for secret in SECRETS), text


class FailingBackend(ScriptedBackend):
    """A backend whose submit fails the way an unmapped Ray error would."""

    async def submit(self, request) -> None:
        self.submitted.append(request.request_id)
        raise RuntimeError(f"RayTaskError(RuntimeError): {LEAK}")

    async def health(self) -> dict:
        raise RuntimeError(f"RaySystemError: {LEAK}")


def test_unexpected_error_at_the_gateway_names_the_request_id_only(tiny_model_dir, caplog):
    backend = FailingBackend([])
    app = create_app(backend, Tokenizer(tiny_model_dir), "tiny", MAX_MODEL_LEN)
    try:
        with serve(app) as url:
            response = httpx.post(url + "/v1/completions", json={"prompt": "hi"})
            health = httpx.get(url + "/health")
    finally:
        backend.close()
    assert response.status_code == 500
    error = assert_openai_error(response)
    [request_id] = backend.submitted
    assert error["code"] == "internal_error" and request_id in error["message"]
    assert_no_secrets(response.text)
    assert "RuntimeError" not in response.text
    assert "10.1.2.3" in caplog.text and request_id in caplog.text  # the log has it all
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert_no_secrets(health.text)


class _Broken:
    worker_id = "decode-0"

    def reserve(self, request) -> None:
        raise RuntimeError(f"manual_seed failed: {LEAK}")

    def full(self) -> None:
        raise NoCapacity(9, 2)


def test_worker_actor_sends_untyped_errors_as_internal_error_and_typed_ones_as_they_are():
    actor = WorkerActor.__new__(WorkerActor)  # the actor body without Ray or an engine
    actor.worker = _Broken()
    with pytest.raises(RemoteError) as untyped:
        actor.execute("reserve", None)
    assert untyped.value.wire["type"] == "InternalError"
    assert untyped.value.wire["fields"] == {"where": "decode-0"}
    assert_no_secrets(str(untyped.value.wire))
    with pytest.raises(RemoteError) as typed:
        actor.execute("full")
    assert typed.value.wire["fields"] == {"needed_blocks": 9, "free_blocks": 2}


def test_ray_errors_become_typed_without_their_text():
    failed = ray_errors.RayTaskError("execute", f"Traceback: {LEAK}", RuntimeError(LEAK))
    with pytest.raises(InternalError) as internal:
        raise_typed(failed, "worker call reserve()")
    assert internal.value.where == "worker call reserve()"
    assert_no_secrets(str(internal.value))
    typed = ray_errors.RayTaskError("execute", "", RemoteError(to_wire(NoCapacity(3, 1))))
    with pytest.raises(NoCapacity):
        raise_typed(typed, "worker call reserve()")

    async def router_gone(error: Exception) -> None:
        raise error

    for gone in (ray_errors.RayActorError(actor_id="deadbeefcafe", error_msg=LEAK),
                 ray_errors.ActorUnavailableError(LEAK, b"\xde" * 16)):
        with pytest.raises(RouterUnavailable) as unavailable:
            asyncio.run(_unwrap(router_gone(gone)))
        assert_no_secrets(str(unavailable.value))


def test_engine_failing_to_admit_ends_the_request_at_once_with_a_500(gateway, monkeypatch):
    """Before: the worker logged the failure and the request waited for its deadline."""

    def broken_admit(*args) -> None:
        raise RuntimeError(f"CUDA error: {LEAK}")

    monkeypatch.setattr(gateway.worker.engine.requests, "admit", broken_admit)
    started = time.monotonic()
    response = post(gateway, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert response.status_code == 500 and time.monotonic() - started < 30
    error = assert_openai_error(response)
    assert error["code"] == "internal_error" and "cmpl-" in error["message"]
    assert_no_secrets(response.text)
    monkeypatch.undo()
    assert gateway.wait_all_blocks_free() == NUM_BLOCKS
    assert post(gateway, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200
