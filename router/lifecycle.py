"""A request's life across the cluster: one enum, typed events in, actions out.

Pure: no Ray, no sockets, no clocks. The router (router/router_core.py) owns one
`RequestLife` per request in flight, feeds it what it learns (placement results, worker news,
lost workers, the client leaving) and carries out the actions it returns (tell a worker to
let go, write the final chunk). Which workers hold state for the request is part of the
life (`holders`), so a request that ended frees exactly the workers still holding it.

    any live --Asking(worker)--> same phase, the worker a holder while placement asks it;
             --Declined(worker)--> same phase, it refused (or is gone) and holds nothing
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
is still sent once: by the worker that ends the last attempt, or after `SendFinal`.

A worker being asked to take the request (a placement call in flight) already counts as a
holder (`Asking`), so an end that comes meanwhile tells it to let go too: nothing of the
request leaves any worker after its final chunk (router/final_chunk.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.lifecycle_events import (
    Abort,
    Action,
    Asking,
    ClientGone,
    DeadlinePassed,
    Declined,
    Event,
    Failed,
    Finished,
    FirstToken,
    KvLanded,
    LostWorker,
    Migrate,
    OfAttempt,
    Phase,
    Placed,
    PlacementFailed,
    Reserved,
    SendFinal,
)
from workers.errors import KvrelayError, RequestTimeout


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

    @property
    def asked(self) -> set[str]:
        """Holders that placement is still asking (not yet recorded as placed)."""
        return self.holders - {self.prefill, self.decode, self.whole}

    def _on_Asking(self, event: Asking) -> list[Action] | None:
        if self.phase.terminal:
            return None
        self.holders.add(event.worker)
        return []

    def _on_Declined(self, event: Declined) -> list[Action] | None:
        if self.phase.terminal or event.worker not in self.asked:
            return None
        self.holders.discard(event.worker)
        return []

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
        """Aborts for every holder but `keep`: workers still being asked first, then the
        prefill worker, so its transfer ends as aborted, not as failed by a decode worker that
        let go of the blocks first."""
        order = sorted(self.asked)
        order += [w for w in (self.prefill, self.decode, self.whole) if w in self.holders]
        actions = [Abort(w) for w in order if w != keep]
        self.holders.clear()
        return actions
