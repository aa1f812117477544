"""Token-id prompts (`--prompt-format token_ids`): exact lengths drawn from the workload, ids
inside the vocabulary, counted exactly; the only prompts a server without a tokenizer (random
weights) can serve, shown against kvrelay's real gateway with no tokenizer."""

from __future__ import annotations

import json
import random

import pytest
from scripted_gateway import TokenizerFreeGateway

from loadtest.cli import main
from loadtest.errors import BadFlag
from loadtest.report import load_run
from loadtest.synthetic_ids import first_id, synthesize_ids
from loadtest.workload import LengthRange, Workload, WorkloadConfig


def _ids_config(**overrides) -> WorkloadConfig:
    fields = {"kind": "uniform", "input_len": LengthRange(20, 30),
              "output_len": LengthRange(3, 3), "seed": 4, "prompt_format": "token_ids"}
    return WorkloadConfig(**{**fields, **overrides})


def test_token_id_prompts_have_exact_lengths_inside_the_vocabulary_and_are_reproducible():
    workload = Workload(_ids_config(vocab_size=500))
    specs = [workload.spec(i) for i in range(200)]
    assert all(s.prompt_tokens_exact and len(s.prompt) == s.prompt_tokens for s in specs)
    assert {len(s.prompt) for s in specs} == set(range(20, 31))
    assert all(100 <= t < 500 and isinstance(t, int) for s in specs for t in s.prompt)
    assert len({tuple(s.prompt) for s in specs}) == 200
    assert [Workload(_ids_config(vocab_size=500)).spec(i) for i in (7, 3)] == \
        [specs[7], specs[3]]


def test_token_id_shared_prefix_and_trace_lengths_are_exact():
    workload = Workload(_ids_config(kind="fixed", input_len=LengthRange(50, 50),
                                    shared_prefix_len=32))
    prompts = [workload.spec(i).prompt for i in range(5)]
    assert {len(p) for p in prompts} == {50}
    assert len({tuple(p[:32]) for p in prompts}) == 1 and len({tuple(p) for p in prompts}) == 5


def test_small_vocabularies_keep_ids_below_the_vocabulary_size():
    assert first_id(1000) == 100 and first_id(128256) == 100 and first_id(64) == 32
    ids = synthesize_ids(random.Random(0), 2000, 64)
    assert min(ids) >= 32 and max(ids) < 64 and len(set(ids)) == 32


def test_prompt_files_with_id_lists_are_counted_exactly(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text(json.dumps({"prompt": [5, 6, 7]}) + "\n" + json.dumps({"prompt": "a b"}))
    workload = Workload(WorkloadConfig("file", prompts_file=str(path)))
    first, second = workload.spec(0), workload.spec(1)
    assert (first.prompt, first.prompt_tokens, first.prompt_tokens_exact) == ([5, 6, 7], 3, True)
    assert (second.prompt_tokens, second.prompt_tokens_exact) == (2, False)


def test_token_ids_reject_a_prompts_file_and_a_tiny_vocabulary(tmp_path):
    with pytest.raises(BadFlag, match="--prompt-format"):
        _ids_config(kind="file", prompts_file=str(tmp_path / "p.jsonl"))
    with pytest.raises(BadFlag, match="--vocab-size"):
        _ids_config(vocab_size=1)


def test_run_with_token_ids_sends_id_lists_and_records_exact_prompt_lengths(openai_server,
                                                                            tmp_path):
    sent_before = len(openai_server.received)
    out = tmp_path / "ids"
    rc = main(["run", "--url", openai_server.url, "--model", "tiny", "--prompt-format",
               "token_ids", "--vocab-size", "300", "--input-len", "10:40", "--output-len", "3",
               "--num-requests", "6", "--rate", "50", "--seed", "1", "--no-progress",
               "--output-dir", str(out)])
    assert rc == 0
    doc = load_run(out / "run.json")
    bodies = openai_server.received[sent_before:]
    lengths = {len(b["prompt"]) for b in bodies}
    assert len(bodies) == 6 and all(10 <= n <= 40 for n in lengths)
    assert all(100 <= t < 300 for b in bodies for t in b["prompt"])
    assert sorted(r.prompt_tokens for r in doc.records) == sorted(len(b["prompt"]) for b in bodies)
    assert all(r.ok and r.prompt_tokens_source == "exact" for r in doc.records)
    assert doc.meta["workload"]["prompt_format"] == "token_ids"
    assert "token ids < 300" in (out / "summary.md").read_text()


def test_chat_with_token_ids_exits_2_naming_the_flag(openai_server, tmp_path, capsys):
    rc = main(["run", "--url", openai_server.url, "--model", "tiny", "--endpoint", "chat",
               "--prompt-format", "token_ids", "--num-requests", "1", "--no-progress",
               "--output-dir", str(tmp_path)])
    assert rc == 2 and "--prompt-format='token_ids'" in capsys.readouterr().err


def test_gateway_without_tokenizer_rejects_text_and_serves_token_ids(tmp_path):
    with TokenizerFreeGateway() as gateway:
        text_out, ids_out = tmp_path / "text", tmp_path / "ids"
        common = ["--url", gateway.url, "--model", "dummy", "--input-len", "64:256",
                  "--output-len", "4", "--num-requests", "4", "--rate", "50", "--no-progress"]
        assert main(["run", *common, "--output-dir", str(text_out)]) == 0
        assert main(["run", *common, "--prompt-format", "token_ids", "--vocab-size", "128256",
                     "--output-dir", str(ids_out)]) == 0
        reached = gateway.worker.requests
    text = load_run(text_out / "run.json").records
    assert {r.error for r in text} == {"http_400"}
    assert all("no tokenizer" in r.error_detail for r in text)
    ids = load_run(ids_out / "run.json").records
    assert all(r.ok and r.output_tokens == 4 for r in ids)
    # No text, but `return_token_ids` makes each token a timed chunk: TTFT and TPOT exist.
    assert all(r.ttft is not None and r.ttft > 0 and r.tpot is not None for r in ids)
    # Each prompt reached the worker at its exact length (the gateway tokenizes in a thread
    # pool, so requests sent 20 ms apart may reach the worker in another order).
    assert sorted(len(q.prompt_token_ids) for q in reached) == \
        sorted(r.prompt_tokens for r in ids)
    assert all(64 <= r.prompt_tokens <= 256 for r in ids)
