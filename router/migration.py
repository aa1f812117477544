"""Migration at the router: a request whose worker was lost continues on a live one.

The lifecycle (router/lifecycle.py) decides: a lost holder moves the request to MIGRATING
with a `Migrate(attempt)` action, while migrations are left (`RouterConfig.max_migrations`).
`begin` carries it out: a `Resume` on the request's output channel asks the gateway, which
knows every token the client got, for a continuation (`GenerateRequest.continued`: the same
request id and prompt, the output so far, the new attempt). The gateway hands it to `resume`
(Router.resume), which places it like a new request (remote prefill of prompt + output and a
transfer, or one worker whole); its workers stream from the next token index on. A
continuation that finds no worker ends the request with that typed error (PlacementFailed),
and so does a continuation that does not come within `RouterConfig.resume_timeout_s` (the
Resume or the gateway was lost): nothing holds blocks while a request migrates, and its entry
at the router goes too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from router.lifecycle import Event, Migrate, Phase, PlacementFailed
from router.placement import Placement
from router.policies import blocks_needed
from router.router_state import InFlight, RouterConfig
from workers.actors.output_sender import OutputSender
from workers.errors import KvrelayError
from workers.protocol import GenerateRequest, Resume

log = logging.getLogger(__name__)

Apply = Callable[[InFlight, Event], Awaitable[bool]]


class NoContinuation(KvrelayError):
    """The gateway sent no continuation of a migrating request in time."""

    def __init__(self, waited_s: float):
        self.waited_s = waited_s
        super().__init__(f"the gateway sent no continuation within {waited_s:g} s")


class Migration:
    """Asks gateways for continuations and places them; counts migrations."""

    def __init__(self, sender: OutputSender, placement: Placement, apply: Apply,
                 config: RouterConfig):
        self._sender = sender
        self._placement = placement
        self._apply = apply
        self._block_size = config.block_size
        self._resume_timeout_s = config.resume_timeout_s
        self._waits: set[asyncio.Task] = set()
        """One per migration awaiting its continuation (`_expire`)."""
        self.started = 0
        """Migrations begun (a Resume sent)."""
        self.from_phase: Counter[str] = Counter()
        """Migrations begun, by the phase the request was in when its worker was lost."""
        self.placed = 0
        """Continuations placed on live workers."""
        self.failed = 0
        """Continuations no worker took, or that never came."""
        self.seconds = 0.0
        """Sum over placed continuations of the time from the loss to their placement."""

    def begin(self, entry: InFlight, action: Migrate) -> None:
        """Asks the request's gateway for a continuation as attempt `action.attempt`."""
        entry.lost_at = time.monotonic()
        self.started += 1
        self.from_phase[action.lost_in.value] += 1
        log.info("request %s migrates (attempt %d): worker %s lost", entry.request_id,
                 action.attempt, action.lost_worker)
        self._sender.send(entry.request.output_address,
                          Resume(entry.request_id, action.attempt, action.lost_worker))
        wait = asyncio.get_running_loop().create_task(self._expire(entry, action.attempt))
        self._waits.add(wait)
        wait.add_done_callback(self._waits.discard)

    async def _expire(self, entry: InFlight, attempt: int) -> None:
        """Fails the request if continuation `attempt` has not come in time."""
        await asyncio.sleep(self._resume_timeout_s)
        if entry.request.attempt < attempt:
            log.warning("request %s: no continuation (attempt %d) in %g s", entry.request_id,
                        attempt, self._resume_timeout_s)
            if await self._apply(entry, PlacementFailed(NoContinuation(self._resume_timeout_s),
                                                        attempt=attempt)):
                self.failed += 1

    def close(self) -> None:
        for wait in list(self._waits):
            wait.cancel()

    async def resume(self, entry: InFlight | None, request: GenerateRequest) -> None:
        """Places the gateway's continuation of a migrating request; one that is not awaited
        (the request ended meanwhile, or a duplicate) is ignored."""
        if entry is None or entry.life.phase is not Phase.MIGRATING or \
                request.attempt != entry.life.migrations:
            log.info("continuation %s of attempt %d not awaited; ignored", request.request_id,
                     request.attempt)
            return
        entry.request = request
        entry.blocks = blocks_needed(request.num_known_tokens, self._block_size)
        try:
            await self._placement.place(entry)
        except KvrelayError as exc:
            self.failed += 1
            await self._apply(entry, PlacementFailed(exc, attempt=request.attempt))
            return
        self.placed += 1
        self.seconds += time.monotonic() - (entry.lost_at or time.monotonic())

    def stats(self) -> dict:
        return {"migrations": self.started, "migrations_placed": self.placed,
                "migrations_failed": self.failed, "migration_placement_seconds": self.seconds,
                "migrated_from_phase": dict(self.from_phase)}
