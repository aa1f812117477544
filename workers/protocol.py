"""Messages that cross process boundaries between gateway, router and workers.

Plain dataclasses of plain values, encoded with msgpack by `encode` / `decode` (one codec for
all of them; tensors never travel here: KV moves on the data plane, workers/kv_transfer/).
Direction of each message is in its docstring.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack


@dataclass
class GenerateRequest:
    """Gateway -> Router -> workers: one admitted, tokenized request."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    """SamplingParams fields (workers/engine/sampling_params.py) as a dict."""
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


class WorkerEvent(str, enum.Enum):
    """Worker -> Router (in the poll's `events`, as (request_id, attempt, event)): news about
    one placement of a request."""

    SENDING = "sending"
    """Prefill worker: token 1 is out, the last of the KV on its way."""
    SHIPPED = "shipped"
    """Prefill worker: the KV landed on the decode worker; this worker let go."""
    FINISHED = "finished"
    """The final chunk (stop or length) is sent."""
    FAILED = "failed"
    """An error was sent as the final chunk."""


_TYPES = {cls.__name__: cls for cls in (GenerateRequest, OutputChunk, Resume)}


def register(cls: type) -> type:
    """Adds a dataclass to the codec; use as a decorator on other wire messages."""
    _TYPES[cls.__name__] = cls
    return cls


def encode(msg: Any) -> bytes:
    return msgpack.packb([type(msg).__name__, dataclasses.asdict(msg)], use_bin_type=True)


def decode(data: bytes) -> Any:
    name, fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return _TYPES[name](**fields)
