"""Workloads: lengths, shared prefixes, prompt files and traces; seeded and reproducible."""

from __future__ import annotations

import json

import pytest

from loadtest.errors import BadFlag, BadInputFile
from loadtest.synthetic_text import WORDS
from loadtest.trace import TraceEntry
from loadtest.workload import LengthRange, Workload, WorkloadConfig


def test_fixed_workload_has_exact_lengths_and_is_reproducible():
    config = WorkloadConfig("fixed", LengthRange(40, 40), LengthRange(7, 7), seed=5)
    specs = [Workload(config).spec(i) for i in range(5)]
    assert all(len(s.prompt.split()) == 40 == s.prompt_tokens for s in specs)
    assert all(s.max_tokens == 7 for s in specs)
    assert all(word in WORDS for s in specs for word in s.prompt.split())
    assert len({s.prompt for s in specs}) == 5  # distinct prompts: no accidental cache hits
    again = Workload(config)
    assert [again.spec(i) for i in (4, 0, 2)] == [specs[4], specs[0], specs[2]]
    other_seed = Workload(WorkloadConfig("fixed", LengthRange(40, 40), LengthRange(7, 7), seed=6))
    assert other_seed.spec(0).prompt != specs[0].prompt


def test_uniform_lengths_stay_in_range_and_cover_it():
    config = WorkloadConfig("uniform", LengthRange(5, 9), LengthRange(1, 3), seed=1)
    workload = Workload(config)
    specs = [workload.spec(i) for i in range(300)]
    assert {len(s.prompt.split()) for s in specs} == {5, 6, 7, 8, 9}
    assert {s.max_tokens for s in specs} == {1, 2, 3}


def test_shared_prefix_is_identical_across_requests_and_the_rest_is_not():
    config = WorkloadConfig("fixed", LengthRange(50, 50), LengthRange(4, 4),
                            shared_prefix_len=32, seed=2)
    workload = Workload(config)
    prompts = [workload.spec(i).prompt.split() for i in range(6)]
    assert all(len(p) == 50 for p in prompts)
    assert len({tuple(p[:32]) for p in prompts}) == 1
    assert len({tuple(p[32:]) for p in prompts}) == 6


def test_prompt_file_is_cycled_with_its_own_max_tokens(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "hello there world"},
             {"messages": [{"role": "user", "content": "hi you"}], "max_tokens": 3}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    workload = Workload(WorkloadConfig("file", output_len=LengthRange(9, 9),
                                       prompts_file=str(path)))
    specs = [workload.spec(i) for i in range(4)]
    assert [s.prompt for s in specs[:2]] == [lines[0]["prompt"], lines[1]["messages"]]
    assert specs[2].prompt == specs[0].prompt and specs[3].prompt == specs[1].prompt
    assert [s.max_tokens for s in specs] == [9, 3, 9, 3]
    assert [s.prompt_tokens for s in specs[:2]] == [3, 2]
    assert workload.size is None


def test_trace_workload_takes_lengths_from_the_trace():
    trace = [TraceEntry(0.0, 12, 3), TraceEntry(0.5, 20, 1)]
    workload = Workload(WorkloadConfig("trace"), trace)
    assert workload.size == 2
    assert [(len(workload.spec(i).prompt.split()), workload.spec(i).max_tokens)
            for i in range(2)] == [(12, 3), (20, 1)]


def test_bad_workload_inputs_are_refused(tmp_path):
    assert LengthRange.parse("64:256", "--input-len") == LengthRange(64, 256)
    assert LengthRange.parse(8, "--input-len") == LengthRange(8, 8)
    for text in ("0", "9:3", "a", "1:2:3"):
        with pytest.raises(BadFlag):
            LengthRange.parse(text, "--input-len")
    with pytest.raises(BadFlag):
        WorkloadConfig("fixed", LengthRange(1, 5))
    with pytest.raises(BadFlag):
        WorkloadConfig("file")
    with pytest.raises(BadFlag):
        Workload(WorkloadConfig("trace"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": ""}\n')
    with pytest.raises(BadInputFile) as info:
        Workload(WorkloadConfig("file", prompts_file=str(empty)))
    assert info.value.line == 1
