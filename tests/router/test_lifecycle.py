"""router/lifecycle.py: every transition of a request's life, step by step, and every illegal
event refused by name (nothing changes when one is refused); migration after a lost worker,
its bound, and stale events of an earlier attempt."""

from __future__ import annotations

import copy

import pytest

from router.lifecycle import (
    Abort,
    Asking,
    ClientGone,
    DeadlinePassed,
    Declined,
    Failed,
    Finished,
    FirstToken,
    IllegalEvent,
    KvLanded,
    LostWorker,
    Migrate,
    Phase,
    Placed,
    PlacementFailed,
    RequestLife,
    Reserved,
    SendFinal,
    WorkerLost,
)
from workers.errors import NoReadyWorker, RequestTimeout


def life_at(phase: Phase, max_migrations: int = 0) -> RequestLife:
    """A disaggregated request driven to `phase` (decode D, prefill P); MIGRATING: D was
    lost while decoding."""
    life = RequestLife("r", max_migrations=max(max_migrations, phase is Phase.MIGRATING))
    path = {
        Phase.QUEUED: [],
        Phase.RESERVED: [Reserved("D")],
        Phase.PREFILLING: [Reserved("D"), Placed("P")],
        Phase.TRANSFERRING: [Reserved("D"), Placed("P"), FirstToken("P")],
        Phase.DECODING: [Reserved("D"), Placed("P"), FirstToken("P"), KvLanded("P")],
        Phase.FINISHED: [Reserved("D"), Placed("P"), FirstToken("P"), KvLanded("P"),
                         Finished("D")],
        Phase.FAILED: [Reserved("D"), Placed("P"), Failed("P")],
        Phase.ABORTED: [ClientGone()],
        Phase.MIGRATING: [Reserved("D"), Placed("P"), FirstToken("P"), KvLanded("P"),
                          LostWorker("D")],
    }[phase]
    for event in path:
        life.apply(event)
    assert life.phase is phase
    return life


def test_disaggregated_happy_path_lets_the_prefill_worker_go_once_the_kv_landed():
    life = RequestLife("r")
    assert life.apply(Reserved("D")) == [] and life.phase is Phase.RESERVED
    assert life.holders == {"D"} and life.decode == "D"
    assert life.apply(Placed("P")) == [] and life.phase is Phase.PREFILLING
    assert life.holders == {"D", "P"} and life.prefill == "P"
    assert life.apply(FirstToken("P")) == [] and life.phase is Phase.TRANSFERRING
    assert life.apply(KvLanded("P")) == [] and life.phase is Phase.DECODING
    assert life.holders == {"D"}
    # Finished on the decode worker: nobody else holds it, so no abort goes anywhere.
    assert life.apply(Finished("D")) == [] and life.phase is Phase.FINISHED
    assert life.holders == set()


def test_kv_may_land_before_token_one_is_reported():
    life = life_at(Phase.PREFILLING)
    assert life.apply(KvLanded("P")) == [] and life.phase is Phase.DECODING


def test_one_worker_runs_it_whole():
    life = RequestLife("r")
    assert life.apply(Placed("C", whole=True)) == [] and life.phase is Phase.DECODING
    assert life.whole == "C" and life.holders == {"C"}
    assert life.apply(Finished("C")) == [] and life.phase is Phase.FINISHED


def test_a_worker_ending_it_early_frees_the_others():
    life = life_at(Phase.TRANSFERRING)  # e.g. max_tokens=1: the prefill worker ends it
    assert life.apply(Finished("P")) == [Abort("D")] and life.phase is Phase.FINISHED
    life = life_at(Phase.PREFILLING)
    assert life.apply(Failed("P")) == [Abort("D")] and life.phase is Phase.FAILED


@pytest.mark.parametrize("phase", [Phase.QUEUED, Phase.RESERVED, Phase.PREFILLING,
                                   Phase.TRANSFERRING, Phase.DECODING])
def test_client_gone_aborts_every_holder_and_sends_the_final_chunk(phase):
    life = life_at(phase)
    holders = [w for w in ("P", "D") if w in life.holders]  # the prefill worker first
    actions = life.apply(ClientGone())
    assert actions == [*(Abort(w) for w in holders), SendFinal("abort")]
    assert life.phase is Phase.ABORTED and life.holders == set()


def test_a_worker_being_asked_holds_the_request_until_placed_or_declined():
    life = RequestLife("r")
    assert life.apply(Asking("D")) == [] and life.phase is Phase.QUEUED
    assert life.holders == {"D"} and life.asked == {"D"}
    assert life.apply(Declined("D")) == [] and life.holders == set()
    life.apply(Asking("D2"))
    assert life.apply(Reserved("D2")) == [] and life.asked == set()
    assert life.apply(Asking("P")) == [] and life.asked == {"P"}
    assert life.apply(Placed("P")) == [] and life.holders == {"D2", "P"}


def test_an_end_while_a_worker_is_asked_aborts_it_first():
    """The final chunk comes after every holder let go, the one being asked included."""
    life = life_at(Phase.RESERVED)
    life.apply(Asking("P"))
    assert life.apply(ClientGone()) == [Abort("P"), Abort("D"), SendFinal("abort")]


def test_a_worker_being_asked_may_end_it_itself():
    life = RequestLife("r")
    life.apply(Asking("C"))  # it ran the request whole and finished before placement heard
    assert life.apply(Finished("C")) == [] and life.phase is Phase.FINISHED


def test_deadline_fails_it_with_a_typed_timeout():
    life = life_at(Phase.DECODING)
    *aborts, final = life.apply(DeadlinePassed(2.5))
    assert aborts == [Abort("D")] and life.phase is Phase.FAILED
    assert final.reason == "error" and isinstance(final.error, RequestTimeout)
    assert final.error.deadline_s == 2.5


def test_lost_decode_worker_fails_it_and_frees_the_prefill_worker():
    life = life_at(Phase.TRANSFERRING)
    *aborts, final = life.apply(LostWorker("D"))
    assert aborts == [Abort("P")] and life.phase is Phase.FAILED
    assert isinstance(final.error, WorkerLost) and final.error.worker_id == "D"
    assert final.error.phase == "transferring"


def test_lost_prefill_worker_after_its_kv_landed_leaves_the_decode_worker_going():
    life = life_at(Phase.TRANSFERRING)
    assert life.apply(LostWorker("P", kv_landed=True)) == []
    assert life.phase is Phase.DECODING and life.holders == {"D"}


def test_lost_prefill_worker_before_its_kv_landed_fails_it():
    life = life_at(Phase.PREFILLING)
    *aborts, final = life.apply(LostWorker("P"))
    assert aborts == [Abort("D")] and isinstance(final.error, WorkerLost)
    assert life.phase is Phase.FAILED


def test_losing_a_worker_that_no_longer_holds_it_changes_nothing():
    life = life_at(Phase.DECODING)
    assert life.apply(LostWorker("P")) == [] and life.phase is Phase.DECODING


LIVE = [Phase.RESERVED, Phase.PREFILLING, Phase.TRANSFERRING, Phase.DECODING]


@pytest.mark.parametrize("phase", LIVE)
def test_lost_decode_worker_migrates_and_frees_the_others(phase):
    life = life_at(phase, max_migrations=2)
    others = sorted(life.holders - {"D"})
    migrate = Migrate(1, "D", phase)
    assert life.apply(LostWorker("D")) == [*(Abort(w) for w in others), migrate]
    assert life.phase is Phase.MIGRATING and life.holders == set()
    assert life.migrations == 1 and life.decode is None and life.prefill is None


@pytest.mark.parametrize("phase", [Phase.PREFILLING, Phase.TRANSFERRING])
def test_lost_prefill_worker_before_its_kv_landed_migrates(phase):
    life = life_at(phase, max_migrations=2)
    assert life.apply(LostWorker("P")) == [Abort("D"), Migrate(1, "P", phase)]
    assert life.phase is Phase.MIGRATING


def test_continuation_is_placed_like_a_new_request_as_the_next_attempt():
    life = life_at(Phase.MIGRATING)
    assert life.apply(Reserved("D2", attempt=1)) == [] and life.phase is Phase.RESERVED
    assert life.apply(Placed("P", attempt=1)) == [] and life.phase is Phase.PREFILLING
    assert life.apply(FirstToken("P", attempt=1)) == [] and life.phase is Phase.TRANSFERRING
    assert life.apply(KvLanded("P", attempt=1)) == [] and life.phase is Phase.DECODING
    assert life.apply(Finished("D2", attempt=1)) == [] and life.phase is Phase.FINISHED


def test_whole_placement_migrates_to_another_whole_placement():
    life = RequestLife("r", max_migrations=1)
    life.apply(Placed("C", whole=True))
    assert life.apply(LostWorker("C")) == [Migrate(1, "C", Phase.DECODING)]
    assert life.apply(Placed("C2", whole=True, attempt=1)) == []
    assert life.phase is Phase.DECODING and life.holders == {"C2"}


def test_migrations_are_bounded_then_the_loss_fails_it_clearly():
    life = RequestLife("r", max_migrations=2)
    for attempt in (0, 1):
        life.apply(Placed("C", whole=True, attempt=attempt))
        assert life.apply(LostWorker("C")) == [Migrate(attempt + 1, "C", Phase.DECODING)]
    life.apply(Placed("C", whole=True, attempt=2))
    (final,) = life.apply(LostWorker("C"))
    assert life.phase is Phase.FAILED and isinstance(final.error, WorkerLost)
    assert final.error.migrations == 2 and "2 migration(s) before" in str(final.error)


def test_a_continuation_no_worker_takes_fails_it_naming_the_loss_and_why():
    life = life_at(Phase.MIGRATING)
    (final,) = life.apply(PlacementFailed(NoReadyWorker("decode", 2), attempt=1))
    assert life.phase is Phase.FAILED and isinstance(final.error, WorkerLost)
    assert final.error.worker_id == "D" and final.error.phase == "decoding"
    assert "continuing it on another worker failed" in str(final.error)
    assert str(NoReadyWorker("decode", 2)) in str(final.error)


def test_client_gone_while_migrating_only_sends_the_final_chunk():
    life = life_at(Phase.MIGRATING)
    assert life.apply(ClientGone()) == [SendFinal("abort")] and life.phase is Phase.ABORTED


def test_losing_another_worker_while_migrating_changes_nothing():
    life = life_at(Phase.MIGRATING)
    assert life.apply(LostWorker("P")) == [] and life.phase is Phase.MIGRATING


ILLEGAL = [
    (Phase.QUEUED, Placed("P")),  # a prefill worker before any reservation
    (Phase.QUEUED, FirstToken("P")),
    (Phase.QUEUED, KvLanded("P")),
    (Phase.QUEUED, Finished("D")),  # from a worker that holds nothing
    (Phase.QUEUED, Declined("D")),  # never asked
    (Phase.RESERVED, Declined("D")),  # placed already: it lets go by Abort, not by declining
    (Phase.MIGRATING, Asking("D2")),  # stale: asked by the placement of attempt 0
    (Phase.RESERVED, Reserved("D2")),
    (Phase.RESERVED, Placed("C", whole=True)),
    (Phase.RESERVED, FirstToken("P")),
    (Phase.PREFILLING, FirstToken("X")),  # not its prefill worker
    (Phase.PREFILLING, KvLanded("D")),
    (Phase.TRANSFERRING, FirstToken("P")),  # twice
    (Phase.DECODING, KvLanded("P")),  # twice
    (Phase.DECODING, Failed("P")),  # the prefill worker let go already
    (Phase.DECODING, Placed("P")),
    (Phase.DECODING, Finished("D", attempt=1)),  # of an attempt that does not exist
    (Phase.MIGRATING, Reserved("D2")),  # stale: the placement of attempt 0, still running
    (Phase.MIGRATING, Placed("C", whole=True)),
    (Phase.MIGRATING, Placed("P", attempt=1)),  # a prefill worker before any reservation
    (Phase.MIGRATING, FirstToken("P", attempt=1)),
    (Phase.MIGRATING, Finished("D")),  # the lost attempt's worker
    (Phase.MIGRATING, Finished("D", attempt=1)),  # from a worker that holds nothing
    *[(phase, event) for phase in (Phase.FINISHED, Phase.FAILED, Phase.ABORTED)
      for event in (Asking("D"), Declined("D"), Reserved("D"), Placed("P"), FirstToken("P"),
                    KvLanded("P"), Finished("D"), Failed("D"), LostWorker("D"),
                    PlacementFailed(NoReadyWorker("decode", 1)), ClientGone(),
                    DeadlinePassed(1.0))],
]


@pytest.mark.parametrize(("phase", "event"), ILLEGAL,
                         ids=[f"{p.value}-{type(e).__name__}" for p, e in ILLEGAL])
def test_illegal_events_are_refused_by_name_and_change_nothing(phase, event):
    life = life_at(phase)
    before = copy.deepcopy(life)
    with pytest.raises(IllegalEvent, match=type(event).__name__) as refused:
        life.apply(event)
    assert refused.value.phase is phase and phase.value in str(refused.value)
    assert life == before
