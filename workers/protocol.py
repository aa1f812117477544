"""Messages that cross process boundaries between gateway, router and workers.

Plain dataclasses of plain values, encoded with msgpack by `encode` / `decode` (one codec for
all of them, a message inside a message included; tensors never travel here: KV moves on the
data plane, workers/kv_transfer/). Direction of each message is in its docstring. Ray calls
carry the same dataclasses as arguments and answers (workers/actors/worker_api.py lists the
calls a worker answers).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from workers.engine.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    """Gateway -> Router -> workers: one admitted, tokenized request."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    output_address: str
    """ZMQ address of the gateway's PULL socket; workers PUSH OutputChunk there."""
    priority: int = 0
    arrival_time: float = 0.0
    """time.time() at the gateway."""
    output_token_ids: list[int] = field(default_factory=list)
    """A continuation (its worker was lost, docs/contracts.md "Migration"): the output tokens
    the client already got. The engine treats them as output (stop strings, max_tokens,
    penalties, the seeded sampler's position) and streams from `resume_index`."""
    sent_text_len: int = 0
    """A continuation: characters of output text the client already got."""
    attempt: int = 0
    """0, or which migration of the request this continuation is; its chunks carry it."""

    @property
    def resume_index(self) -> int:
        """Index of the first output token this placement streams."""
        return len(self.output_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Prompt plus the output already known: the tokens prefilled before the next sample."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def attempt_id(self) -> str:
        """What workers key this placement by (engine, KV transfer, router news): the request
        id, suffixed for a continuation, so a worker still letting go of an earlier attempt
        (blocks held until a send ends) never mixes it up with the next."""
        return self.request_id if self.attempt == 0 else f"{self.request_id}#{self.attempt}"

    def continued(self, resume: Resume, output_token_ids: list[int],
                  sent_text_len: int) -> GenerateRequest:
        """The continuation the gateway submits on `resume`, from what the client got."""
        return dataclasses.replace(self, output_token_ids=list(output_token_ids),
                                   sent_text_len=sent_text_len, attempt=resume.attempt)


@dataclass
class OutputChunk:
    """Worker -> Gateway (ZMQ PUSH/PULL): new tokens of one request, or its end or error."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    text_delta: str = ""
    finished: bool = False
    finish_reason: str | None = None
    """'stop' | 'length' | 'abort' | 'error' | None."""
    error: str | None = None
    """Human-readable error when finish_reason == 'error'."""
    error_type: str | None = None
    """Class name of the typed error (workers/errors.py), for the HTTP status mapping."""
    error_param: str | None = None
    """The request field the error is about (InvalidParameter's `field`), OpenAI's `param`."""
    logprobs: list[dict[str, Any]] | None = None
    """Per new token: {'token_id', 'logprob', 'top': [[token_id, logprob], ...]}."""
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV the prefilling worker found in its prefix cache."""
    index: int | None = None
    """Position of the first of `new_token_ids` in the output (token 1 is 0). Up to three
    processes write one request's stream, so the gateway orders chunks by it; None: hand
    over on arrival (a chunk that carries no tokens, or a test script's)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase, sent on the final chunk: queue, prefill, kv_ready_delay (end of
    prefill to the KV landed on the decode worker), decode; plus transfer_bytes and
    transfer_wire (first KV posted to the last landed)."""
    worker_id: str = ""
    attempt: int = 0
    """The GenerateRequest.attempt this chunk belongs to: after a Resume the gateway drops
    chunks of earlier attempts (a lost worker's last words)."""


@dataclass
class Resume:
    """Router -> Gateway (on the request's output channel): the worker streaming the request
    was lost; submit a continuation (`GenerateRequest.continued`) with attempt `attempt` from
    the tokens the client got, and drop any chunk of an earlier attempt from now on."""

    request_id: str
    attempt: int
    lost_worker: str = ""


@dataclass
class LetGo:
    """Worker -> Router, the answer to `abort`: how far this worker streamed the attempt, so
    the final chunk goes out behind its last token (router/final_chunk.py)."""

    last_index: int = -1
    """Index of the last output token this worker streamed for the attempt; -1: none."""
    ended: bool = False
    """This worker already sent the attempt's final chunk (it finished or failed it)."""


@dataclass
class Reservation:
    """Decode worker -> Router -> Prefill worker, the answer to `reserve`: where the prefill
    worker writes the request's KV."""

    worker_id: str
    """The decode worker that holds the blocks."""
    block_ids: list[int]
    kv_address: str
    """The decode worker's KV receiver."""
    num_cached_tokens: int = 0
    """Leading tokens whose KV the decode worker has cached (their blocks are not written)."""


@dataclass
class WorkerReport:
    """Worker -> Router, the answer to `report` (the router's health check, every
    `poll_interval_s`): who it is, whether its engine loop runs, and its load."""

    worker_id: str
    incarnation: str
    """Fresh per construction: a restarted worker answers with a new one."""
    role: str
    alive: bool
    free_blocks: int
    total_blocks: int
    num_live: int
    kv_address: str | None = None
    """Decode workers: their KV receiver, which prefill workers pair with."""
    kv_events: dict[str, Any] | None = None
    """The prefix cache's events since the last report (workers/actors/kv_event_buffer.py),
    for the router's KV index; None without a prefix cache."""
    prefix_cache: dict[str, int] | None = None
    """Tokens looked up in and found by the prefix cache (`queries`, `hits`)."""


class WorkerEvent(str, enum.Enum):
    """What a `WorkerNews` says about one placement of a request."""

    SENDING = "sending"
    """Prefill worker: token 1 is out, the last of the KV on its way."""
    SHIPPED = "shipped"
    """Prefill worker: the KV landed on the decode worker; this worker let go."""
    FINISHED = "finished"
    """The final chunk (stop or length) is sent."""
    FAILED = "failed"
    """An error was sent as the final chunk."""


@dataclass
class WorkerNews:
    """Worker -> Router (ZMQ PUSH to the address each router gives in its `report` calls),
    pushed as it happens: `event` of placement `attempt` of `request_id`."""

    worker_id: str
    incarnation: str
    request_id: str
    attempt: int
    event: WorkerEvent

    def __post_init__(self) -> None:
        self.event = WorkerEvent(self.event)


# ---- the codec ---------------------------------------------------------------------------

_NESTED = 1
"""msgpack extension code of a message inside a message."""
_BUILD: dict[str, Callable[[dict[str, Any]], Any]] = {}
_FIELDS: dict[type, Callable[[Any], dict[str, Any]]] = {}


def register(cls: type, build: Callable[[dict[str, Any]], Any] | None = None,
             fields: Callable[[Any], dict[str, Any]] | None = None) -> type:
    """Adds a dataclass to the codec (use as a decorator); `build` and `fields` replace
    `cls(**fields)` and its fields where the class has its own wire form."""
    _BUILD[cls.__name__] = build or (lambda values: cls(**values))
    _FIELDS[cls] = fields or (lambda msg: {f.name: getattr(msg, f.name)
                                           for f in dataclasses.fields(msg)})
    return cls


for _cls in (GenerateRequest, OutputChunk, Resume, LetGo, Reservation, WorkerReport,
             WorkerNews):
    register(_cls)
register(SamplingParams, SamplingParams.from_dict, SamplingParams.to_dict)


def _pack(msg: Any) -> list[Any]:
    return [type(msg).__name__, _FIELDS[type(msg)](msg)]


def _nested(obj: Any) -> msgpack.ExtType:
    if type(obj) not in _FIELDS:
        raise TypeError(f"{type(obj).__name__} is not a wire message (workers/protocol.py)")
    return msgpack.ExtType(_NESTED, msgpack.packb(_pack(obj), default=_nested,
                                                  use_bin_type=True))


def _unpack(data: bytes) -> Any:
    name, fields = msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext)
    return _BUILD[name](fields)


def _ext(code: int, data: bytes) -> Any:
    if code != _NESTED:
        return msgpack.ExtType(code, data)
    return _unpack(data)


def encode(msg: Any) -> bytes:
    """One message as msgpack: [class name, fields], messages inside it as extensions."""
    return msgpack.packb(_pack(msg), default=_nested, use_bin_type=True)


def decode(data: bytes) -> Any:
    """The message `encode` made (a registered class)."""
    return _unpack(data)
