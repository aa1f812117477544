"""router/lifecycle.py: every transition of a request's life, step by step, and every illegal
event refused by name (nothing changes when one is refused)."""

from __future__ import annotations

import copy

import pytest

from router.lifecycle import (
    Abort,
    ClientGone,
    DeadlinePassed,
    Failed,
    Finished,
    FirstToken,
    IllegalEvent,
    KvLanded,
    LostWorker,
    Phase,
    Placed,
    RequestLife,
    Reserved,
    SendFinal,
    WorkerLost,
)
from workers.errors import RequestTimeout


def life_at(phase: Phase) -> RequestLife:
    """A disaggregated request driven to `phase` (decode D, prefill P)."""
    life = RequestLife("r")
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
    holders = sorted(life.holders)
    actions = life.apply(ClientGone())
    assert actions == [*(Abort(w) for w in holders), SendFinal("abort")]
    assert life.phase is Phase.ABORTED and life.holders == set()


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


ILLEGAL = [
    (Phase.QUEUED, Placed("P")),  # a prefill worker before any reservation
    (Phase.QUEUED, FirstToken("P")),
    (Phase.QUEUED, KvLanded("P")),
    (Phase.QUEUED, Finished("D")),  # from a worker that holds nothing
    (Phase.RESERVED, Reserved("D2")),
    (Phase.RESERVED, Placed("C", whole=True)),
    (Phase.RESERVED, FirstToken("P")),
    (Phase.PREFILLING, FirstToken("X")),  # not its prefill worker
    (Phase.PREFILLING, KvLanded("D")),
    (Phase.TRANSFERRING, FirstToken("P")),  # twice
    (Phase.DECODING, KvLanded("P")),  # twice
    (Phase.DECODING, Failed("P")),  # the prefill worker let go already
    (Phase.DECODING, Placed("P")),
    *[(phase, event) for phase in (Phase.FINISHED, Phase.FAILED, Phase.ABORTED)
      for event in (Reserved("D"), Placed("P"), FirstToken("P"), KvLanded("P"), Finished("D"),
                    Failed("D"), LostWorker("D"), ClientGone(), DeadlinePassed(1.0))],
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
