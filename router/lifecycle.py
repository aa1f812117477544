"""A request's life across the cluster: one enum, typed events in, actions out.

Pure: no Ray, no sockets, no clocks. The router (router/router_core.py) owns one
`RequestLife` per request in flight, feeds it what it learns (placement results, worker news,
lost workers, the client leaving) and carries out the actions it returns (tell a worker to
let go, write the final chunk). Which workers hold state for the request is part of the
life (`holders`), so a request that ended frees exactly the workers still holding it.

    QUEUED --Reserved(decode)--> RESERVED --Placed(prefill)--> PREFILLING
    QUEUED --Placed(one worker runs it whole)--> DECODING
    PREFILLING --FirstToken--> TRANSFERRING --KvLanded--> DECODING (the prefill worker let go)
    any live --Finished / Failed (that worker ended it)--> FINISHED / FAILED
    any live --LostWorker(holder)--> MIGRATING (Migrate), or DECODING if the KV had already
             landed, or FAILED (WorkerLost) once `max_migrations` are spent
    MIGRATING --Reserved / Placed(whole) of the continuation--> RESERVED / DECODING
    any live --PlacementFailed (a continuation found no worker)--> FAILED
    any live --ClientGone--> ABORTED;  --DeadlinePassed--> FAILED

Migration (docs/contracts.md "Migration"): the router owns the decision, the gateway the
tokens. A lost holder moves the request to MIGRATING: the other holders let go and the
`Migrate` action asks the gateway (a `Resume` on the request's output channel) to submit a
continuation, the prompt plus every output token the client got, which placement takes like
a new request as attempt `migrations`. Each placement is one attempt; events of a placement
or a worker name their attempt, and those of an earlier one (a worker that was let go, a
placement that was still running when the loss came) are refused as stale. The final chunk
is still sent once: by the worker that ends the last attempt, or by the router.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from workers.errors import KvrelayError, RequestTimeout


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


Event = Reserved | Placed | FirstToken | KvLanded | Finished | Failed | LostWorker | \
    PlacementFailed | ClientGone | DeadlinePassed


# ---- actions (what the router does) ----------------------------------------------------

@dataclass(frozen=True)
class Abort:
    worker: str
    """Tell this worker to let go of the request (free its blocks, stop its transfer)."""


@dataclass(frozen=True)
class SendFinal:
    reason: str
    """'abort' or 'error': the router writes the request's final chunk."""
    error: KvrelayError | None = None


@dataclass(frozen=True)
class Migrate:
    attempt: int
    """Ask the gateway for a continuation as this attempt (router/migration.py)."""
    lost_worker: str
    lost_in: Phase


Action = Abort | SendFinal | Migrate


class WorkerLost(KvrelayError):
    """The worker serving a request died (or restarted) before the request finished, and
    the request could not migrate (migration off, or `migrations` already spent)."""

    def __init__(self, worker_id: str, phase: str, migrations: int = 0, detail: str = ""):
        self.worker_id = worker_id
        self.phase = phase
        self.migrations = migrations
        super().__init__(f"worker {worker_id} was lost while the request was {phase}{detail}")


class IllegalEvent(KvrelayError):
    """An event that does not fit the request's phase (late or from the wrong worker)."""

    def __init__(self, request_id: str, phase: Phase, event: Event):
        self.phase = phase
        self.event = event
        super().__init__(f"request {request_id}: {type(event).__name__} is illegal while "
                         f"{phase.value} ({event})")


@dataclass
class RequestLife:
    request_id: str
    phase: Phase = Phase.QUEUED
    prefill: str | None = None
    decode: str | None = None
    whole: str | None = None
    """The one worker that runs the request whole, if so."""
    holders: set[str] = field(default_factory=set)
    """Workers that hold state for the request (blocks, a transfer, a live sequence)."""
    max_migrations: int = 0
    """How many lost workers the request may survive (0: migration off)."""
    migrations: int = 0
    """Migrations so far: the current attempt."""
    last_loss: Migrate | None = None
    """The loss that began the current migration."""

    def apply(self, event: Event) -> list[Action]:
        """Moves to the event's phase and returns what the router must do; raises
        IllegalEvent (nothing changed) for an event that does not fit, or of an earlier
        attempt."""
        if isinstance(event, OfAttempt) and event.attempt != self.migrations:
            raise IllegalEvent(self.request_id, self.phase, event)
        handler = getattr(self, f"_on_{type(event).__name__}")
        actions = handler(event)
        if actions is None:
            raise IllegalEvent(self.request_id, self.phase, event)
        return actions

    def _on_Reserved(self, event: Reserved) -> list[Action] | None:
        if self.phase not in (Phase.QUEUED, Phase.MIGRATING):
            return None
        self.phase, self.decode = Phase.RESERVED, event.worker
        self.holders.add(event.worker)
        return []

    def _on_Placed(self, event: Placed) -> list[Action] | None:
        if event.whole and self.phase in (Phase.QUEUED, Phase.MIGRATING):
            self.phase, self.whole = Phase.DECODING, event.worker
        elif not event.whole and self.phase is Phase.RESERVED:
            self.phase, self.prefill = Phase.PREFILLING, event.worker
        else:
            return None
        self.holders.add(event.worker)
        return []

    def _on_FirstToken(self, event: FirstToken) -> list[Action] | None:
        if self.phase is not Phase.PREFILLING or event.worker != self.prefill:
            return None
        self.phase = Phase.TRANSFERRING
        return []

    def _on_KvLanded(self, event: KvLanded) -> list[Action] | None:
        if self.phase not in (Phase.PREFILLING, Phase.TRANSFERRING) or \
                event.worker != self.prefill:
            return None
        self.phase = Phase.DECODING
        self.holders.discard(event.worker)
        return []

    def _on_Finished(self, event: Finished) -> list[Action] | None:
        return self._ended_by(event.worker, Phase.FINISHED)

    def _on_Failed(self, event: Failed) -> list[Action] | None:
        return self._ended_by(event.worker, Phase.FAILED)

    def _ended_by(self, worker: str, phase: Phase) -> list[Action] | None:
        """A worker sent the final chunk: the others that still hold the request let go."""
        if self.phase.terminal or worker not in self.holders:
            return None
        self.phase = phase
        return self._release(keep=worker)

    def _on_LostWorker(self, event: LostWorker) -> list[Action] | None:
        if self.phase.terminal:
            return None
        if event.worker not in self.holders:
            return []  # it held nothing of this request (any more)
        if event.worker == self.prefill and event.kv_landed and \
                self.phase in (Phase.PREFILLING, Phase.TRANSFERRING):
            return self._on_KvLanded(KvLanded(event.worker))  # the decode worker goes on
        lost_in = self.phase
        self.holders.discard(event.worker)
        if self.migrations < self.max_migrations:
            self.migrations += 1
            self.phase = Phase.MIGRATING
            self.prefill = self.decode = self.whole = None
            self.last_loss = Migrate(self.migrations, event.worker, lost_in)
            return [*self._release(), self.last_loss]
        self.phase = Phase.FAILED
        spent = f" ({self.migrations} migration(s) before, the most allowed)" \
            if self.migrations else ""
        error = WorkerLost(event.worker, lost_in.value, self.migrations, spent)
        return [*self._release(), SendFinal("error", error)]

    def _on_PlacementFailed(self, event: PlacementFailed) -> list[Action] | None:
        """The continuation found no worker: WorkerLost for the loss that began it."""
        if self.phase.terminal or self.last_loss is None:
            return None
        self.phase = Phase.FAILED
        loss = self.last_loss
        error = WorkerLost(loss.lost_worker, loss.lost_in.value, self.migrations,
                           f"; continuing it on another worker failed: {event.error}")
        return [*self._release(), SendFinal("error", error)]

    def _on_ClientGone(self, event: ClientGone) -> list[Action] | None:
        if self.phase.terminal:
            return None
        self.phase = Phase.ABORTED
        return [*self._release(), SendFinal("abort")]

    def _on_DeadlinePassed(self, event: DeadlinePassed) -> list[Action] | None:
        if self.phase.terminal:
            return None
        self.phase = Phase.FAILED
        return [*self._release(), SendFinal("error", RequestTimeout(event.timeout_s))]

    def _release(self, keep: str | None = None) -> list[Action]:
        """Aborts for every holder but `keep`: the prefill worker first, so its transfer ends
        as aborted, not as failed by a decode worker that let go of the blocks first."""
        order = [w for w in (self.prefill, self.decode, self.whole) if w in self.holders]
        order += sorted(self.holders - set(order))
        actions = [Abort(w) for w in order if w != keep]
        self.holders.clear()
        return actions
