"""Per-transfer states, deadlines and callbacks (pure bookkeeping, no sockets)."""

from __future__ import annotations

import time

import pytest

from workers.errors import DuplicateRequest
from workers.kv_transfer import TransferState
from workers.kv_transfer.transfer_table import TransferTable


def _table():
    events = []
    table = TransferTable(lambda rid, extra: events.append(("done", rid, extra)),
                          lambda rid, state, reason: events.append((state.value, rid, reason)))
    return table, events


def test_parts_complete_the_transfer_once_all_cells_landed():
    table, events = _table()
    table.add("r", 10, cells_needed=8)
    assert table.in_flight("r") and table.get("r").state is TransferState.RESERVED
    table.start("r")
    assert not table.add_part("r", "heads 0-2", 4, 100, 0.1, {"first_token_id": 7})
    assert not table.add_part("r", "heads 0-2", 4, 100, 0.1, {})  # a retried part counts once
    assert table.get("r").state is TransferState.SENDING and table.in_flight("r")
    assert table.add_part("r", "heads 2-4", 4, 100, 0.1, {})
    assert not table.in_flight("r") and table.wait("r", 0) is TransferState.DONE
    assert events == [("done", "r", {"first_token_id": 7})]
    assert table.get("r").num_bytes == 300


def test_deadline_fails_in_flight_transfers_and_first_outcome_wins():
    table, events = _table()
    table.add("late", 0.05)
    table.add("fine", 10)
    assert table.expire() == []
    time.sleep(0.06)
    assert [r.request_id for r in table.expire()] == ["late"]
    assert table.get("late").state is TransferState.FAILED
    assert "timeout" in table.get("late").reason
    assert not table.finish("late", TransferState.DONE)  # a late success cannot revive it
    assert events == [("failed", "late", table.get("late").reason)]
    assert table.in_flight("fine")


def test_abort_is_idempotent_and_frees_the_id_for_reuse():
    table, events = _table()
    table.add("r", 10)
    with pytest.raises(DuplicateRequest):
        table.add("r", 10)
    assert table.end("r", TransferState.ABORTED, "aborted")
    assert not table.end("r", TransferState.ABORTED, "aborted")
    assert events == [("aborted", "r", "aborted")]
    table.add("r", 10)  # a terminal record may be replaced (retry of the same request)
    assert table.in_flight("r")


def test_old_terminal_records_are_forgotten_but_live_ones_kept():
    table = TransferTable(keep_finished=2)
    table.add("live", 10)
    for i in range(5):
        table.add(f"r{i}", 10)
        table.finish(f"r{i}", TransferState.DONE)
    table.add("next", 10)
    assert table.get("r0") is None and table.get("r4") is not None
    assert table.in_flight("live")


def test_live_and_expire_see_only_in_flight_records_whatever_is_kept():
    """The in-flight index stays exact through every transition: finish, a terminal id
    re-added, trimming, and expiry."""
    table = TransferTable(keep_finished=3)
    for i in range(10):
        table.add(f"done{i}", 10)
        table.finish(f"done{i}", TransferState.DONE)
    table.add("slow", 0.0)
    table.add("ok", 10)
    table.start("ok")
    table.add("done9", 10)  # a terminal id re-added: in flight again, no longer kept as done
    assert sorted(r.request_id for r in table.live()) == ["done9", "ok", "slow"]
    assert [r.request_id for r in table.expire(time.monotonic() + 1e-3)] == ["slow"]
    assert sorted(r.request_id for r in table.live()) == ["done9", "ok"]
    # kept: the 3 newest outcomes (slow, then done8, done7); older ones forgotten
    table.add("trim", 10)
    kept = [f"done{i}" for i in range(10) if table.get(f"done{i}") is not None]
    assert kept == ["done7", "done8", "done9"] and table.get("slow").state is TransferState.FAILED
    table.finish("ok", TransferState.DONE)
    table.end("done9", TransferState.ABORTED, "aborted")
    assert [r.request_id for r in table.live()] == ["trim"]
