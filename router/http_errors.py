"""The one place that maps typed errors (workers/errors.py) to HTTP statuses.

Errors reach the gateway two ways: raised in-process (validation, admission, the router's
`submit`) or named in a worker's error chunk (`OutputChunk.error_type`, the class name).
Both go through `STATUS_BY_ERROR`, so an error type has one status wherever it happens. The
body is OpenAI's `{"error": {"message", "type", "param", "code"}}`. Bad input is always 4xx;
500 is only for errors not listed here, i.e. genuine internal failures.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from workers import errors

STATUS_BY_ERROR: dict[str, int] = {
    errors.InvalidParameter.__name__: 400,
    errors.PromptTooLong.__name__: 400,
    errors.EmptyPrompt.__name__: 400,
    errors.UnknownTokenIds.__name__: 400,
    errors.DuplicateRequest.__name__: 409,
    errors.UnknownModel.__name__: 404,
    errors.QueueFull.__name__: 429,
    errors.NoReadyWorker.__name__: 503,
    # Every decode worker was full: the cluster is overloaded, not the request wrong.
    errors.NoCapacity.__name__: 503,
    errors.RequestTimeout.__name__: 504,
    # The KV handoff between a prefill and a decode worker failed: an infrastructure fault
    # (the request was fine), so the client may retry.
    errors.TransferFailed.__name__: 503,
    errors.TransferTimeout.__name__: 503,
    errors.HandshakeMismatch.__name__: 503,
    # The worker serving a request died mid-way (router/router_core.py): retry elsewhere.
    "WorkerLost": 503,
    # Ray's names for an actor (the Router) that is dead or restarting; no ray import here.
    "RayActorError": 503,
    "ActorDiedError": 503,
    "ActorUnavailableError": 503,
}

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

# Retry-After for statuses where retrying later is the right move but no estimate came along.
_DEFAULT_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class HttpError:
    """A mapped error: status, OpenAI body, and headers (Retry-After)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def status_for(error_type: str | None) -> int:
    """HTTP status of an error class name; 500 for anything not a known typed error."""
    return STATUS_BY_ERROR.get(error_type or "", 500)


def error_body(message: str, status: int, param: str | None, code: str | None) -> dict[str, Any]:
    kind = _TYPE_BY_STATUS.get(status, "internal_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_exception(exc: BaseException, param: str | None = None) -> HttpError:
    """Maps a raised error; `param` names the request field when the caller knows it better
    than the error does (e.g. 'messages' for a chat prompt that is too long)."""
    name = type(exc).__name__
    status = status_for(name)
    if status == 500:
        message = f"internal error: {name}: {exc}"
    else:
        message = str(exc)
    param = getattr(exc, "field", None) or param
    retry_after = getattr(exc, "retry_after", None)
    return _build(status, message, param, name, retry_after)


def from_chunk(error_type: str | None, message: str | None) -> HttpError:
    """Maps a worker's error chunk (typed error travelled by class name)."""
    name = error_type or "InternalError"
    status = status_for(error_type)
    text = message or name
    return _build(status, text if status != 500 else f"internal error: {name}: {text}", None, name)


def from_validation(exc: RequestValidationError) -> HttpError:
    """FastAPI's 422 becomes OpenAI's 400, naming the first offending field."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return _build(400, f"malformed JSON body: {first.get('msg', '')}", None, "InvalidJSON")
    param = ".".join(loc) or None
    message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
    return _build(400, message, param, errors.InvalidParameter.__name__)


def from_http_status(status: int, detail: str) -> HttpError:
    """Starlette's own errors (unknown path 404, wrong method 405) in the OpenAI shape."""
    return _build(status, str(detail), None, "HTTPError")


def _build(
    status: int, message: str, param: str | None, name: str, retry_after: float | None = None
) -> HttpError:
    headers: dict[str, str] = {}
    if status in (429, 503):
        seconds = retry_after if retry_after is not None else _DEFAULT_RETRY_AFTER_S
        headers["Retry-After"] = str(max(1, math.ceil(seconds)))
    return HttpError(status, error_body(message, status, param, _snake(name)), headers)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
