"""Scheduler step by step on CPU: budgets, chunked prefill, decodes first, preemption, policies.

A fake "model" here is just a list of next tokens fed to `postprocess`; the scheduler never
sees tensors, so every StepInput field is checked exactly.
"""

from __future__ import annotations

import itertools

from workers.config import SchedulerConfig
from workers.engine.block_pool import BlockPool
from workers.engine.sampling_params import SamplingParams
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import Sequence, SequenceStatus, SequenceTimes

_arrivals = itertools.count()


def make_seq(seq_id: str, prompt_len: int, priority: int = 0) -> Sequence:
    return Sequence(
        seq_id=seq_id,
        prompt_token_ids=list(range(100, 100 + prompt_len)),
        params=SamplingParams(max_tokens=8),
        arrival_index=next(_arrivals),
        times=SequenceTimes(arrival=0.0),
        priority=priority,
    )


def make_scheduler(num_blocks=16, block_size=4, **kwargs) -> Scheduler:
    return Scheduler(SchedulerConfig(**kwargs), BlockPool(num_blocks, block_size))


def run_step(sched: Scheduler, token: int = 7):
    batch = sched.schedule()
    sched.postprocess(batch, [token] * len(batch.sampled))
    return batch


def test_single_prefill_then_decode_builds_exact_step_inputs():
    sched = make_scheduler(block_size=4)
    seq = make_seq("a", 6)
    sched.add(seq)
    step = run_step(sched, token=42).step
    table = seq.block_table
    assert step.seq_ids == ["a"]
    assert step.token_ids == list(range(100, 106))
    assert step.positions == list(range(6))
    assert step.slot_mapping == [table[p // 4] * 4 + p % 4 for p in range(6)]
    assert (step.query_start_loc, step.seq_lens, step.logits_indices) == ([0, 6], [6], [5])
    assert seq.output_token_ids == [42] and seq.num_computed_tokens == 6
    step = run_step(sched).step
    assert step.token_ids == [42] and step.positions == [6] and step.seq_lens == [7]
    assert step.slot_mapping == [table[1] * 4 + 2] and step.logits_indices == [0]


def test_chunked_prefill_splits_prompt_and_samples_only_at_the_end():
    sched = make_scheduler(max_num_batched_tokens=4)
    seq = make_seq("a", 10)
    sched.add(seq)
    chunks = []
    while not seq.output_token_ids:
        batch = run_step(sched)
        chunks.append((batch.step.positions, batch.step.logits_indices))
    assert chunks == [([0, 1, 2, 3], []), ([4, 5, 6, 7], []), ([8, 9], [1])]


def test_long_prefill_threshold_caps_chunk_size():
    sched = make_scheduler(long_prefill_token_threshold=3)
    sched.add(make_seq("a", 7))
    sizes = [run_step(sched).num_new_tokens[0] for _ in range(3)]
    assert sizes == [3, 3, 1]


def test_decodes_go_first_and_prefill_gets_the_rest_of_the_budget():
    sched = make_scheduler(num_blocks=32, max_num_batched_tokens=5)
    a, b = make_seq("a", 3), make_seq("b", 2)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled in one step (3 + 2 = 5 tokens)
    c = make_seq("c", 9)
    sched.add(c)
    batch = run_step(sched)
    assert batch.step.seq_ids == ["a", "b", "c"]
    assert batch.num_new_tokens == [1, 1, 3]
    assert batch.step.query_start_loc == [0, 1, 2, 5]
    assert [s.seq_id for s in batch.sampled] == ["a", "b"]


def test_max_num_seqs_limits_running():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add(make_seq(f"s{i}", 2))
    batch = run_step(sched)
    assert batch.step.seq_ids == ["s0", "s1"] and len(sched.waiting) == 1


def test_no_chunking_waits_for_whole_prompt_budget():
    sched = make_scheduler(max_num_batched_tokens=4, enable_chunked_prefill=False)
    sched.add(make_seq("a", 3))
    sched.add(make_seq("b", 3))
    assert run_step(sched).step.seq_ids == ["a"]
    assert run_step(sched).step.seq_ids == ["a", "b"]


def test_out_of_blocks_preempts_latest_by_recompute_and_it_resumes():
    sched = make_scheduler(num_blocks=4, block_size=2)
    a, b = make_seq("a", 4), make_seq("b", 4)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # 4 blocks used, both sampled one token
    batch = run_step(sched)  # a needs a 3rd block: b (latest) is preempted
    assert [s.seq_id for s in batch.preempted] == ["b"]
    assert batch.step.seq_ids == ["a"]
    assert b.status is SequenceStatus.WAITING and b.block_table == []
    assert b.num_computed_tokens == 0 and b.output_token_ids == [7]
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    sched.remove(a)
    sched.pool.release(a.block_table)
    batch = run_step(sched, token=8)  # b recomputes prompt + its token, then samples
    assert batch.step.seq_ids == ["b"]
    assert batch.step.token_ids == [100, 101, 102, 103, 7]
    assert b.output_token_ids == [7, 8]


def test_sequence_preempts_itself_when_nothing_lower_ranked_is_left():
    sched = make_scheduler(num_blocks=5, block_size=2)
    a, b = make_seq("a", 4), make_seq("b", 4)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # 4 of 5 blocks used
    batch = run_step(sched)  # a takes the last block; b, already lowest, evicts itself
    assert batch.step.seq_ids == ["a"] and batch.preempted == [b]
    assert sched.running == [a] and sched.pool.num_free == 2


def test_priority_preemption_evicts_the_lower_priority_sequence():
    sched = make_scheduler(num_blocks=3, block_size=2, policy="priority")
    low = make_seq("low", 2, priority=5)
    high = make_seq("high", 4, priority=0)
    sched.add(low)
    sched.add(high)
    run_step(sched)  # high: 2 blocks, low: 1 block
    batch = run_step(sched)  # both need a new block; high ranks first and evicts low
    assert [s.seq_id for s in batch.preempted] == ["low"]
    assert batch.step.seq_ids == ["high"]


def test_priority_policy_admits_lowest_value_first():
    sched = make_scheduler(policy="priority", max_num_seqs=1)
    sched.add(make_seq("later", 2, priority=3))
    sched.add(make_seq("urgent", 2, priority=1))
    assert run_step(sched).step.seq_ids == ["urgent"]


def test_fcfs_ignores_priority():
    sched = make_scheduler(policy="fcfs", max_num_seqs=1)
    sched.add(make_seq("first", 2, priority=3))
    sched.add(make_seq("second", 2, priority=1))
    assert run_step(sched).step.seq_ids == ["first"]


def test_remove_waiting_or_running_then_release_frees_all_blocks():
    sched = make_scheduler(num_blocks=8, block_size=2, max_num_batched_tokens=4)
    a, b = make_seq("a", 6), make_seq("b", 2)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a half prefilled, b waiting
    for seq in (a, b):
        sched.remove(seq)
        sched.pool.release(seq.block_table)
    assert not sched.has_unfinished() and sched.pool.num_free == 8
