"""Routing policies order workers as documented, step by step, without Ray."""

from router.policies import (
    KvCapacityAware,
    LeastOutstandingTokens,
    RoundRobin,
    WorkerLoad,
    blocks_needed,
    make_policy,
)


def test_round_robin_cycles_through_every_worker():
    policy = RoundRobin()
    workers = [WorkerLoad("b"), WorkerLoad("a"), WorkerLoad("c")]
    firsts = [policy.order(workers, 1)[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert sorted(policy.order(workers, 1)) == ["a", "b", "c"]


def test_least_outstanding_tokens_prefers_lightest_and_rotates_ties():
    policy = LeastOutstandingTokens()
    workers = [WorkerLoad("a", 500), WorkerLoad("b", 100), WorkerLoad("c", 100)]
    orders = [policy.order(workers, 1) for _ in range(3)]
    assert {o[0] for o in orders} == {"b", "c"}
    assert all(o[-1] == "a" for o in orders)


def test_kv_capacity_puts_workers_that_fit_first_most_free_first():
    policy = KvCapacityAware()
    workers = [
        WorkerLoad("small", free_blocks=3),
        WorkerLoad("big", free_blocks=50),
        WorkerLoad("mid", free_blocks=10),
    ]
    assert policy.order(workers, 5) == ["big", "mid", "small"]
    assert policy.order(workers, 60) == ["big", "mid", "small"]  # stale counts: still tried


def test_blocks_needed_counts_prompt_plus_first_token_slot():
    assert blocks_needed(15, 16) == 1
    assert blocks_needed(16, 16) == 2
    assert blocks_needed(1, 4) == 1


def test_make_policy_rejects_unknown_name():
    assert make_policy("round_robin").name == "round_robin"
    try:
        make_policy("random")
    except ValueError as exc:
        assert "random" in str(exc)
    else:
        raise AssertionError("unknown policy accepted")
