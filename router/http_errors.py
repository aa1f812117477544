"""The one place that maps typed errors (workers/errors.py) to HTTP statuses.

Errors reach the gateway two ways: raised in-process (validation, admission, the router's
`submit`) or named in a worker's error chunk (`OutputChunk.error_type`, the class name).
Both go through `STATUS_BY_ERROR`, so an error type has one status wherever it happens. The
body is OpenAI's `{"error": {"message", "type", "param", "code"}}`: `code` is the error's
class name in snake_case (`prompt_too_long`), `param` the request field as the client sent it.
Bad input is always 4xx; 500 is only for errors not listed here, i.e. genuine internal
failures, and its message names the request id and nothing else (pids, addresses and Ray
actor ids stay in the log, under that id).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from router.request_models import field_path
from workers import errors

log = logging.getLogger(__name__)

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
    # The Router actor is dead or restarting (router/router.py maps Ray's errors to it).
    errors.RouterUnavailable.__name__: 503,
    errors.InternalError.__name__: 500,
}

# Codes of what pydantic refuses, by its error type; every other refusal is invalid_parameter.
_VALIDATION_CODES = {"json_invalid": "invalid_json", "extra_forbidden": "unknown_parameter",
                     "unsupported_parameter": "unsupported_parameter"}

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
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


def from_exception(
    exc: BaseException, param: str | None = None, request_id: str | None = None
) -> HttpError:
    """Maps a raised error; `param` names the request field when the caller knows it better
    than the error does (e.g. 'messages' for a chat prompt that is too long). Anything but a
    typed error is a 500 whose message carries only `request_id`."""
    name = type(exc).__name__
    if not isinstance(exc, errors.KvrelayError) or status_for(name) == 500:
        return internal(request_id, f"{name}: {exc}")
    param = getattr(exc, "field", None) or param
    return _build(status_for(name), str(exc), param, name, getattr(exc, "retry_after", None))


def from_chunk(
    error_type: str | None, message: str | None, param: str | None = None,
    request_id: str | None = None,
) -> HttpError:
    """Maps a worker's error chunk (typed error travelled by class name)."""
    name = error_type or "InternalError"
    status = status_for(error_type)
    if status == 500:
        return internal(request_id, f"{name}: {message}")
    return _build(status, message or name, param, name)


def internal(request_id: str | None, detail: str) -> HttpError:
    """A 500 for the client (the request id, no internals) and the detail for the log."""
    log.error("internal error serving request %s: %s", request_id, detail)
    message = (f"internal error serving request {request_id}; the server log has the details"
               if request_id else "internal error; the server log has the details")
    return _build(500, message, None, errors.InternalError.__name__)


def from_validation(exc: RequestValidationError) -> HttpError:
    """FastAPI's 422 becomes OpenAI's 400, naming the first offending field as sent."""
    first = exc.errors()[0] if exc.errors() else {}
    kind = first.get("type", "")
    loc = [part for part in first.get("loc", ()) if part != "body"]
    code = _VALIDATION_CODES.get(kind, "invalid_parameter")
    if kind == "json_invalid":
        return _build(400, f"malformed JSON body: {first.get('msg', '')}", None, code)
    param = field_path(loc, unknown=kind == "extra_forbidden")
    if kind == "extra_forbidden":
        message = f"unknown parameter {param!r}; this server refuses fields it does not know"
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
    return _build(400, message, param, code)


# FastAPI answers 400 itself for a body its JSON parser gave up on (e.g. a 5,000-digit number).
_CODE_BY_STATUS = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed",
                   413: "request_too_large", 503: "shutting_down"}


def from_http_status(status: int, detail: str) -> HttpError:
    """Errors the gateway's HTTP layer raises itself in the OpenAI shape: Starlette's (unknown
    path 404, wrong method 405), the body limit's 413 and the drain's 503."""
    return _build(status, str(detail), None, _CODE_BY_STATUS.get(status, "http_error"))


def _build(
    status: int, message: str, param: str | None, name: str, retry_after: float | None = None
) -> HttpError:
    headers: dict[str, str] = {}
    if status in (429, 503):
        seconds = retry_after if retry_after is not None else _DEFAULT_RETRY_AFTER_S
        headers["Retry-After"] = str(max(1, math.ceil(seconds)))
    return HttpError(status, error_body(message, status, param, snake_case(name)), headers)


def snake_case(name: str) -> str:
    """`PromptTooLong` -> `prompt_too_long`, `InvalidJSON` -> `invalid_json`; a name already
    in snake_case stays as it is."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
