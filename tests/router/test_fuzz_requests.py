"""Property: no body, however odd, gets a 5xx from /v1/completions or /v1/chat/completions,
and every error is OpenAI-shaped (hypothesis, over real HTTP to the real engine worker).

Bodies start valid and get fields of the request models (and unknown ones) set to arbitrary
JSON: huge and negative integers, booleans, NaN and infinities, strings, nested lists and
objects. Generation lengths stay small so a valid body costs milliseconds.
"""

from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.request_models import FIELD_NAMES, SimpleGenerateRequest
from tests.router.test_bad_input import assert_openai_error

EXTREMES = [2**63, 2**64, -(2**63) - 1, 10**30, 1e308, -1e308, 1e-300, [2**64]]
"""Well-typed values past every range: what strict types let through to the range checks."""
EDGES = st.sampled_from([*EXTREMES, 0, -1, 2**63 - 1, 2**64 - 1, float("inf"), float("nan"),
                         "", "8", True, None, [], {}, [1.5]])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12),
                    st.floats(allow_nan=True, allow_infinity=True))
VALUES = st.one_of(EDGES, SCALARS, st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8))
# Fields whose valid values would ask for long generations get small ones (or junk).
LENGTHS = st.one_of(st.integers(-3, 6), VALUES)
# One field kvrelay implements gets an odd value (so it reaches the sampler and the engine),
# a few others anything, known or not.
LENGTH_FIELDS = ["max_tokens", "max_completion_tokens", "min_tokens"]
SAMPLING_FIELDS = sorted(set(SimpleGenerateRequest.model_fields) - {"prompt", *LENGTH_FIELDS})
SAMPLING = st.sampled_from(SAMPLING_FIELDS)
NUMERIC_FIELDS = [name for name, field in SimpleGenerateRequest.model_fields.items()
                  if "int" in str(field.annotation) or "float" in str(field.annotation)]
NAMES = st.one_of(st.sampled_from(sorted(FIELD_NAMES - set(LENGTH_FIELDS))),
                  st.text(min_size=1, max_size=10))
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "bot"]),
     "content": st.one_of(st.text(max_size=20), VALUES)},
    optional={"name": VALUES, "tool_call_id": VALUES, "tool_calls": VALUES, "extra": VALUES})
PLAIN_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]),
                                      "content": st.text(max_size=20)})
PROMPTS = st.one_of(st.text(max_size=30), st.lists(st.integers(-2, 600), max_size=8),
                    st.lists(st.lists(st.integers(0, 600), max_size=4), max_size=2), VALUES)


def mutated(base: dict) -> st.SearchStrategy[dict]:
    focus = st.dictionaries(SAMPLING, VALUES, min_size=1, max_size=1)
    others = st.one_of(st.just({}), st.dictionaries(NAMES, VALUES, max_size=2))
    lengths = st.dictionaries(st.sampled_from(LENGTH_FIELDS), LENGTHS, max_size=2)
    return st.builds(lambda f, o, n: {**base, **o, **f, **n}, focus, others, lengths)


COMPLETION_BODIES = st.builds(lambda p, b: {**b, "prompt": p} if p is not None else b,
                              st.one_of(st.none(), PROMPTS),
                              mutated({"prompt": "hi", "max_tokens": 3}))
CHAT_BODIES = st.builds(lambda m, b: {**b, "messages": m},
                        st.lists(st.one_of(PLAIN_MESSAGE, PLAIN_MESSAGE, MESSAGE),
                                 min_size=0, max_size=3),
                        mutated({"messages": [], "max_tokens": 3}))
FUZZ = settings(max_examples=80, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def check(url: str, path: str, body: dict, client: httpx.Client | None = None) -> None:
    # json.dumps writes NaN and Infinity as Python's JSON reader accepts them.
    response = (client or httpx).post(url + path, content=json.dumps(body).encode(),
                                      timeout=60, headers={"content-type": "application/json"})
    if response.status_code == 504:  # only a request that asked for a short deadline
        assert isinstance(body.get("timeout"), (int, float)) and body["timeout"] < 60, body
    else:
        assert response.status_code < 500, (body, response.text[:300])
    if response.status_code >= 400:
        assert_openai_error(response)
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [e[6:] for e in response.text.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]", response.text[-300:]
        for payload in map(json.loads, events[:-1]):
            assert payload.get("error", {}).get("code") != "internal_error", payload


@FUZZ
@given(body=COMPLETION_BODIES)
def test_completions_never_answer_5xx(gateway, body):
    check(gateway.url, "/v1/completions", body)


@FUZZ
@given(body=CHAT_BODIES)
def test_chat_completions_never_answer_5xx(gateway, body):
    check(gateway.url, "/v1/chat/completions", body)


def test_every_sampling_field_at_every_edge_value_is_never_a_5xx(gateway):
    """The grid random search is unlikely to hit (`top_k: 2**64` on an otherwise valid body):
    each numeric field of both endpoints, alone, at each extreme value."""
    bases = {"/v1/completions": {"prompt": "hi", "max_tokens": 1},
             "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 1}}
    with httpx.Client() as client:
        for path, base in bases.items():
            for field in NUMERIC_FIELDS:
                for value in EXTREMES:
                    check(gateway.url, path, {**base, field: value}, client)
