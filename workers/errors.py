"""Typed errors of kvrelay, each carrying the numbers that explain it.

Every error subclasses `KvrelayError`. The gateway maps each type to one HTTP status in one
place (by class name, so these also travel as `OutputChunk.error_type`). Append-only: other
parts add their errors at the end of this file.
"""

from __future__ import annotations


class KvrelayError(Exception):
    """Base of every error kvrelay raises on purpose."""


class PromptTooLong(KvrelayError):
    """The prompt (plus at least one generated token) does not fit in the context."""

    def __init__(self, length: int, max: int):
        self.length = length
        self.max = max
        super().__init__(f"prompt has {length} tokens; the limit is {max}")


class InvalidParameter(KvrelayError):
    """A sampling or request parameter is out of range; `field` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"invalid parameter {field!r}: {message}")


class EmptyPrompt(KvrelayError):
    """A prompt with zero tokens."""

    def __init__(self) -> None:
        super().__init__("prompt is empty")


class UnknownTokenIds(KvrelayError):
    """Prompt token ids outside [0, vocab_size)."""

    def __init__(self, ids: list[int], vocab_size: int):
        self.ids = list(ids)
        self.vocab_size = vocab_size
        shown = self.ids[:8]
        super().__init__(f"token ids {shown} are outside the vocabulary of size {vocab_size}")


class NoCapacity(KvrelayError):
    """Not enough free KV blocks (or sequence slots) for a request right now."""

    def __init__(self, needed_blocks: int, free_blocks: int):
        self.needed_blocks = needed_blocks
        self.free_blocks = free_blocks
        super().__init__(f"need {needed_blocks} KV blocks, {free_blocks} free")


class DuplicateRequest(KvrelayError):
    """A request id that is already live in this engine."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        super().__init__(f"request {request_id!r} is already in this engine")


class UnknownRequest(KvrelayError):
    """A request id this engine does not hold (for release/commit_remote)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        super().__init__(f"request {request_id!r} is not in this engine")


class QueueFull(KvrelayError):
    """Admission control refused the request; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float, queued: int = 0, limit: int = 0):
        self.retry_after = retry_after
        self.queued = queued
        self.limit = limit
        super().__init__(
            f"queue full ({queued}/{limit} waiting); retry after {retry_after:.1f} s"
        )


class NoReadyWorker(KvrelayError):
    """No worker of the needed role is ready to take the request."""

    def __init__(self, role: str, known: int = 0):
        self.role = role
        self.known = known
        super().__init__(f"no ready {role} worker ({known} known, none ready)")


class UnsupportedArchitecture(KvrelayError):
    """The checkpoint's `architectures[0]` is not one kvrelay implements."""

    def __init__(self, name: str, supported: tuple[str, ...] = ()):
        self.name = name
        self.supported = tuple(supported)
        super().__init__(
            f"architecture {name!r} is not supported; supported: {', '.join(self.supported)}"
        )


class InvalidModelConfig(KvrelayError):
    """A model config.json that is missing or has a field kvrelay cannot use."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"model config {field!r}: {message}")


class CheckpointFileMissing(KvrelayError):
    """A checkpoint file (weights or index) that should exist does not."""

    def __init__(self, path: str, reason: str = "not found"):
        self.path = path
        self.reason = reason
        super().__init__(f"checkpoint file {path}: {reason}")


class MissingTensor(KvrelayError):
    """The checkpoint lacks a tensor the model needs; `name` is its Hugging Face name."""

    def __init__(self, name: str, checkpoint: str):
        self.name = name
        self.checkpoint = checkpoint
        super().__init__(f"tensor {name!r} is missing from checkpoint {checkpoint}")


class TensorShapeMismatch(KvrelayError):
    """A checkpoint tensor whose shape differs from what the model config implies."""

    def __init__(self, name: str, expected: tuple[int, ...], actual: tuple[int, ...]):
        self.name = name
        self.expected = tuple(expected)
        self.actual = tuple(actual)
        super().__init__(
            f"tensor {name!r} has shape {list(self.actual)}; the model expects "
            f"{list(self.expected)}"
        )


class UnknownModel(KvrelayError):
    """The request names a model this gateway does not serve."""

    def __init__(self, model: str, served: list[str]):
        self.model = model
        self.served = list(served)
        super().__init__(f"model {model!r} is not served here; served: {self.served}")


class RequestTimeout(KvrelayError):
    """A request did not finish within its deadline; it was aborted everywhere."""

    def __init__(self, deadline_s: float, tokens_generated: int = 0):
        self.deadline_s = deadline_s
        self.tokens_generated = tokens_generated
        super().__init__(
            f"request did not finish within {deadline_s:.1f} s "
            f"({tokens_generated} tokens generated)"
        )


class HandshakeMismatch(KvrelayError):
    """A KV-transfer pair whose two ends disagree on `field` (model, dtype, block size, KV layout
    or kvrelay version); the pair refuses to transfer."""

    def __init__(self, field: str, local: object, remote: object):
        self.field = field
        self.local = local
        self.remote = remote
        super().__init__(
            f"KV transfer handshake mismatch on {field!r}: local {local!r}, remote {remote!r}"
        )


class TransferFailed(KvrelayError):
    """A KV transfer ended without its data landing (peer error, abort, stale pair)."""

    def __init__(self, request_id: str, reason: str):
        self.request_id = request_id
        self.reason = reason
        super().__init__(f"KV transfer of {request_id!r} failed: {reason}")


class TransferTimeout(KvrelayError):
    """A KV transfer passed its deadline; it was marked FAILED and its pair torn down."""

    def __init__(self, request_id: str, deadline_s: float, elapsed_s: float):
        self.request_id = request_id
        self.deadline_s = deadline_s
        self.elapsed_s = elapsed_s
        super().__init__(
            f"KV transfer of {request_id!r} took over {deadline_s:.2f} s "
            f"({elapsed_s:.2f} s elapsed)"
        )


class InternalError(KvrelayError):
    """An unexpected failure (a bug, or an engine or Ray fault) in `where` (a worker id,
    'router'); its details are in that process's log. The gateway answers 500 naming the
    request id only."""

    def __init__(self, where: str):
        self.where = where
        super().__init__(f"internal error in {where}")


class RouterUnavailable(KvrelayError):
    """The Router actor is dead or restarting (Ray's RayActorError or ActorUnavailableError
    of its handle); the client may retry."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"the router is unavailable ({reason}); retry later")


class InvalidTensor(KvrelayError):
    """A checkpoint tensor that cannot be loaded as stored: a GGUF block type kvrelay does not
    dequantize, a byte count or row length that does not fit its format, or a shape the model
    does not expect. Names the tensor, its format, what was expected and what was found."""

    def __init__(self, name: str, format: str, expected: str, found: str):
        self.name = name
        self.format = format
        self.expected = expected
        self.found = found
        super().__init__(f"tensor {name!r} ({format}): expected {expected}, found {found}")


class InvalidModelPath(KvrelayError):
    """A `--model` that is neither a checkpoint folder, a config.json, a .gguf file nor the
    name of a packaged model."""

    def __init__(self, model: str, reason: str):
        self.model = model
        self.reason = reason
        super().__init__(f"--model {model}: {reason}")
