"""The words of a request's life (router/lifecycle.py): its phases, the events the router
learns and the actions it takes. Plain frozen data; the transitions are RequestLife's."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from workers.errors import KvrelayError


class Phase(str, enum.Enum):
    QUEUED = "queued"
    """Admitted; no worker holds anything yet."""
    RESERVED = "reserved"
    """A decode worker reserved blocks for the KV."""
    PREFILLING = "prefilling"
    """A prefill worker computes the prompt's KV (streaming it out)."""
    TRANSFERRING = "transferring"
    """Token 1 is out; the rest of the KV is landing on the decode worker."""
    DECODING = "decoding"
    """One worker holds everything it needs and streams the rest."""
    MIGRATING = "migrating"
    """A holder was lost; the gateway is asked for a continuation, nobody holds anything."""
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in (Phase.FINISHED, Phase.FAILED, Phase.ABORTED)


# ---- events (what the router learns) ---------------------------------------------------

@dataclass(frozen=True)
class OfAttempt:
    """An event about one placement of the request; refused unless of the current one."""

    attempt: int = field(default=0, kw_only=True)


@dataclass(frozen=True)
class Asking(OfAttempt):
    worker: str
    """Placement asks this worker to take the request (reserve, prefill or run it whole)."""


@dataclass(frozen=True)
class Declined(OfAttempt):
    worker: str
    """The worker placement asked did not take it (refused, or gone)."""


@dataclass(frozen=True)
class Reserved(OfAttempt):
    worker: str
    """The decode worker that reserved blocks."""


@dataclass(frozen=True)
class Placed(OfAttempt):
    worker: str
    whole: bool = False
    """True: this worker runs the request whole (colocated, or a decode worker prefilling a
    short prompt itself); False: the prefill worker for the reservation."""


@dataclass(frozen=True)
class FirstToken(OfAttempt):
    worker: str
    """The prefill worker: token 1 streamed, the last of the KV on its way."""


@dataclass(frozen=True)
class KvLanded(OfAttempt):
    worker: str
    """The prefill worker: its KV landed on the decode worker; it let go of the request."""


@dataclass(frozen=True)
class Finished(OfAttempt):
    worker: str
    """That worker sent the final chunk (stop or length)."""


@dataclass(frozen=True)
class Failed(OfAttempt):
    worker: str
    """That worker sent an error as the final chunk."""


@dataclass(frozen=True)
class LostWorker:
    worker: str
    kv_landed: bool = False
    """For a lost prefill worker: its KV had landed on the decode worker before it died."""


@dataclass(frozen=True)
class PlacementFailed(OfAttempt):
    error: KvrelayError
    """Why no worker took a continuation (NoReadyWorker, NoCapacity, ...)."""


@dataclass(frozen=True)
class ClientGone:
    """The client disconnected or asked to abort."""


@dataclass(frozen=True)
class DeadlinePassed:
    timeout_s: float
    """The request's deadline passed at the gateway."""


Event = Asking | Declined | Reserved | Placed | FirstToken | KvLanded | Finished | Failed | \
    LostWorker | PlacementFailed | ClientGone | DeadlinePassed


# ---- actions (what the router does) ----------------------------------------------------

@dataclass(frozen=True)
class Abort:
    worker: str
    """Tell this worker to let go of the request (free its blocks, stop its transfer)."""


@dataclass(frozen=True)
class SendFinal:
    reason: str
    """'abort' or 'error': the request's final chunk, written once every holder let go, by
    the worker that streamed last or else by the router (router/final_chunk.py)."""
    error: KvrelayError | None = None


@dataclass(frozen=True)
class Migrate:
    attempt: int
    """Ask the gateway for a continuation as this attempt (router/migration.py)."""
    lost_worker: str
    lost_in: Phase


Action = Abort | SendFinal | Migrate
