"""StopChecker on hand-made sequences: order of stop rules, stop-string cuts, hold-back."""

from __future__ import annotations

from workers.engine.sampling_params import SamplingParams
from workers.engine.sequence import Sequence, SequenceTimes
from workers.engine.stop_checker import StopChecker, find_stop_string, streamable_len

EOS = 1


def seq_with(output: list[int], **params) -> Sequence:
    return Sequence(
        seq_id="s",
        prompt_token_ids=[5, 6, 7],
        params=SamplingParams(**params),
        arrival_index=0,
        times=SequenceTimes(arrival=0.0),
        output_token_ids=output,
    )


def reason(output, text="", previous=0, max_model_len=100, **params):
    checker = StopChecker((EOS,), max_model_len)
    return checker.check(seq_with(output, **params), text, previous).finish_reason


def test_eos_stops_unless_ignored_or_before_min_tokens():
    assert reason([9, EOS], max_tokens=8) == "stop"
    assert reason([9, EOS], max_tokens=8, ignore_eos=True) is None
    assert reason([9, EOS], max_tokens=8, min_tokens=3) is None


def test_stop_token_ids_max_tokens_and_context_limit():
    assert reason([9, 4], max_tokens=8, stop_token_ids=(4,)) == "stop"
    assert reason([9, 4], max_tokens=2) == "length"
    assert reason([9, 4], max_tokens=8, max_model_len=5) == "length"  # 3 prompt + 2 output


def test_stop_string_cut_and_earliest_match_wins():
    checker = StopChecker((EOS,), 100)
    decision = checker.check(seq_with([9], stop=("lo", "el")), "hello world", 0)
    assert decision.finish_reason == "stop" and decision.text == "h"


def test_stop_string_search_starts_where_new_text_can_complete_one():
    assert find_stop_string("abcXYZ", 4, ("XYZ",)) == 3  # spans old and new text
    assert find_stop_string("XYZabcdef", 7, ("XYZ",)) is None  # already checked earlier


def test_banned_tokens_until_min_tokens():
    checker = StopChecker((EOS,), 100)
    assert checker.banned_token_ids(seq_with([9], min_tokens=2, stop_token_ids=(4,))) == (1, 4)
    assert checker.banned_token_ids(seq_with([9, 9], min_tokens=2)) == ()
    assert checker.banned_token_ids(seq_with([], min_tokens=1, ignore_eos=True)) == ()


def test_streamable_len_holds_back_a_possible_stop_prefix():
    assert streamable_len("hello wor", ("world!",), finished=False) == 4
    assert streamable_len("hello wor", ("world!",), finished=True) == 9
    assert streamable_len("hello wor", (), finished=False) == 9
