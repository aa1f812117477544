"""workers/protocol.py: every message that crosses a hop (gateway -> router -> workers and
back) survives the one codec unchanged, a message inside a message (the sampling parameters
of a request) included; anything else is refused by name."""

from __future__ import annotations

import pytest

from workers.engine.sampling_params import SamplingParams
from workers.protocol import (
    GenerateRequest,
    LetGo,
    OutputChunk,
    Reservation,
    Resume,
    WorkerEvent,
    WorkerNews,
    WorkerReport,
    decode,
    encode,
)

SAMPLING = SamplingParams(max_tokens=9, temperature=0.7, top_k=5, seed=2**63, stop=("\n", "."),
                          stop_token_ids=(7, 8), logprobs=2, min_tokens=1)

MESSAGES = [
    GenerateRequest("r-1", [1, 2, 3], SAMPLING, "tcp://10.0.0.1:5555", priority=2,
                    arrival_time=12.5, output_token_ids=[4, 5], sent_text_len=3, attempt=1),
    OutputChunk("r-1", [4], "a", True, "stop", logprobs=[{"token_id": 4, "logprob": -0.5,
                                                         "top": [[4, -0.5]]}],
                num_prompt_tokens=3, num_output_tokens=2, index=1,
                timings={"queue": 0.1}, worker_id="decode-0", attempt=1),
    Resume("r-1", 2, "decode-1"),
    LetGo(last_index=7, ended=True),
    Reservation("decode-0", [3, 9, 4], "tcp://10.0.0.2:6000"),
    WorkerReport("prefill-0", "abc", "prefill", True, 90, 96, 2, None),
    WorkerNews("decode-0", "abc", "r-1", 1, WorkerEvent.SHIPPED),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=[type(m).__name__ for m in MESSAGES])
def test_every_hop_message_round_trips_through_the_codec(msg):
    again = decode(encode(msg))
    assert type(again) is type(msg) and again == msg


def test_a_request_carries_typed_sampling_parameters():
    again = decode(encode(MESSAGES[0]))
    assert isinstance(again.sampling, SamplingParams) and again.sampling == SAMPLING
    assert again.sampling.stop == ("\n", ".")  # tuples again, frozen and validated


def test_news_carries_the_enum():
    assert decode(encode(MESSAGES[-1])).event is WorkerEvent.SHIPPED


def test_unknown_sampling_fields_survive_for_newer_gateways():
    params = SamplingParams.from_dict({"max_tokens": 3, "future_field": 1})
    request = GenerateRequest("r", [1], params, "tcp://x:1")
    assert decode(encode(request)).sampling.extra == {"future_field": 1}


def test_a_value_that_is_no_wire_message_is_refused_by_name():
    class Opaque:
        pass

    with pytest.raises(TypeError, match="Opaque"):
        encode(OutputChunk("r", logprobs=[Opaque()]))
