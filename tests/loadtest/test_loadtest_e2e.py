"""Real short runs against a real streaming OpenAI-compatible server (tests/loadtest/
mini_openai_server.py): every record, the JSON, the markdown, the plots, sweep and compare."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main as kvrelay_main
from loadtest.cli import main
from loadtest.report import load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Twelve prompts; directive words make the server fail some of them in known ways.
PROMPTS = ["alpha beta gamma delta", "one two three", "SHORT answer please", "FAIL503 please",
           "BREAK the stream now", "STREAMERROR here", "SLEEP a while", "four five six seven",
           "eight nine", "ten eleven twelve", "red green blue", "north south east west"]
EXPECTED_ERRORS = {3: "http_503", 4: "broken_stream", 5: "stream_error", 6: "timeout"}


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def test_run_of_12_requests_records_every_request_and_writes_reports(openai_server, prompts_file,
                                                                     tmp_path, capsys):
    sent_before = len(openai_server.received)
    out = tmp_path / "run"
    rc = main(["run", "--url", openai_server.url, "--model", "tiny", "--prompts-file",
               str(prompts_file), "--num-requests", "12", "--rate", "40", "--concurrency", "4",
               "--output-len", "6", "--ignore-eos", "--timeout", "1.0", "--seed", "3",
               "--slo", "ttft=1s", "--slo", "tpot=250ms", "--output-dir", str(out),
               "--label", "mini server"])
    assert rc == 0
    doc = load_run(out / "run.json")
    assert [r.index for r in doc.records] == list(range(12))
    for record, prompt in zip(doc.records, PROMPTS, strict=True):
        assert record.error == EXPECTED_ERRORS.get(record.index), record
        if record.error:
            continue
        n_out = 1 if "SHORT" in prompt else 6
        assert (record.output_tokens, record.output_tokens_source) == (n_out, "usage")
        assert (record.prompt_tokens, record.prompt_tokens_source) == (len(prompt.split()),
                                                                       "usage")
        assert len(record.itl) == n_out - 1
        assert 0.02 <= record.ttft < record.e2e  # the server waits 20 ms before token 1
        assert record.e2e == pytest.approx(record.ttft + sum(record.itl), abs=0.1)
        assert (record.tpot is None) == (n_out == 1)
    assert doc.records[3].http_status == 503 and "overloaded" in doc.records[3].error_detail
    assert doc.records[4].ttft is not None  # two tokens arrived before the connection dropped

    s = doc.summary
    assert (s.num_requests, s.num_ok, s.num_failed) == (12, 8, 4)
    assert s.errors == {"http_503": 1, "broken_stream": 1, "stream_error": 1, "timeout": 1}
    assert s.num_good == 8 and s.attainment == pytest.approx(8 / 12)
    assert s.output_tokens.mean == pytest.approx((7 * 6 + 1) / 8)
    assert s.request_throughput == pytest.approx(8 / s.duration_s)
    assert doc.meta["arrival"] == {"kind": "poisson", "rate": 40.0, "burstiness": 1.0,
                                   "concurrency": 4, "trace_speedup": 1.0}

    # Every request went to the given URL, with the body that fixes output lengths.
    bodies = openai_server.received[sent_before:]
    assert len(bodies) == 12 and {b["_path"] for b in bodies} == {"/v1/completions"}
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} and
               b["ignore_eos"] and b["min_tokens"] == b["max_tokens"] == 6 for b in bodies)

    markdown = (out / "summary.md").read_text()
    assert markdown in capsys.readouterr().out
    assert "| TTFT (ms) |" in markdown and "| 8/12 |" in markdown and "66.7%" in markdown
    assert "http_503=1" in markdown and "ttft<=1000ms" in markdown
    assert markdown.startswith("## loadtest: mini server: tiny at http://127.0.0.1:")
    assert is_png(out / "latency_cdf.png")


def test_run_without_usage_counts_chunks_and_estimates_prompt_tokens(
        openai_server_without_usage, tmp_path):
    out = tmp_path / "no-usage"
    rc = main(["run", "--url", openai_server_without_usage.url + "/v1/chat/completions",
               "--model", "tiny", "--endpoint", "chat", "--num-requests", "4",
               "--input-len", "20", "--output-len", "5", "--no-progress",
               "--output-dir", str(out)])
    assert rc == 0
    records = load_run(out / "run.json").records
    assert len(records) == 4 and all(r.ok for r in records)
    assert {(r.output_tokens, r.output_tokens_source) for r in records} == {(5, "chunks")}
    assert {(r.prompt_tokens, r.prompt_tokens_source) for r in records} == {(20, "estimate")}
    assert [b["_path"] for b in openai_server_without_usage.received] == \
        ["/v1/chat/completions"] * 4


def test_sweep_over_two_rates_then_compare_two_runs(openai_server, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["sweep", "--url", openai_server.url, "--model", "tiny", "--rates", "40,20",
               "--num-requests", "6", "--input-len", "16", "--output-len", "4",
               "--slo", "ttft=60s", "--target-attainment", "0.9", "--no-progress",
               "--output-dir", str(out)])
    assert rc == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["load"] for p in sweep["points"]] == [20.0, 40.0]
    assert all(p["summary"]["num_ok"] == 6 for p in sweep["points"])
    assert sweep["best_load"] == 40.0
    for name in ("ttft_vs_rate.png", "tpot_vs_rate.png", "goodput_vs_rate.png"):
        assert is_png(out / name), name
    runs = [out / "rate_20" / "run.json", out / "rate_40" / "run.json"]
    assert all(is_png(r.parent / "latency_cdf.png") for r in runs)
    assert [load_run(r).meta["arrival"]["rate"] for r in runs] == [20.0, 40.0]
    assert "highest rate keeping the target: **40**" in (out / "sweep.md").read_text()
    capsys.readouterr()

    table_path = tmp_path / "compare.md"
    rc = kvrelay_main(["loadtest", "compare", str(runs[0]), str(runs[1]),
                       "--labels", "slow,fast", "--output", str(table_path)])
    assert rc == 0
    table = table_path.read_text()
    assert table in capsys.readouterr().out
    a, b = (load_run(r).summary for r in runs)
    expected = b.request_throughput / a.request_throughput
    assert (f"| request throughput (req/s) | {a.request_throughput:.2f} | "
            f"{b.request_throughput:.2f} | {expected:.3f} |") in table


def test_closed_loop_keeps_concurrency_and_stops_at_its_duration(openai_server, tmp_path):
    out = tmp_path / "closed"
    rc = main(["run", "--url", openai_server.url, "--model", "tiny", "--concurrency", "2",
               "--duration", "0.4", "--input-len", "8", "--output-len", "3", "--no-progress",
               "--output-dir", str(out)])
    assert rc == 0
    doc = load_run(out / "run.json")
    records = doc.records
    assert doc.meta["arrival"]["kind"] == "closed" and len(records) >= 3
    assert all(r.ok and r.start_time < 0.4 for r in records)
    for r in records:  # at no send were more than 2 requests in flight
        in_flight = [o for o in records if o.start_time <= r.start_time < o.start_time + o.e2e]
        assert len(in_flight) <= 2


def test_global_timeout_cancels_in_flight_requests(openai_server, tmp_path):
    prompts = tmp_path / "sleepy.jsonl"
    prompts.write_text('{"prompt": "SLEEP forever"}\n')
    out = tmp_path / "cancelled"
    rc = main(["run", "--url", openai_server.url, "--model", "tiny", "--prompts-file",
               str(prompts), "--num-requests", "3", "--timeout", "30", "--global-timeout",
               "0.5", "--no-progress", "--output-dir", str(out)])
    assert rc == 0
    summary = load_run(out / "run.json").summary
    assert 0.5 <= summary.duration_s < 1.5  # stopped at 0.5 s, not at the 30 s request timeout
    assert summary.errors == {"cancelled": 3} and summary.attainment == 0.0


def test_bad_flags_exit_2_with_the_flag_named(tmp_path, capsys):
    rc = main(["run", "--url", "http://127.0.0.1:9", "--model", "m", "--slo", "ttft=fast",
               "--output-dir", str(tmp_path)])
    assert rc == 2 and "--slo='ttft=fast'" in capsys.readouterr().err
    rc = main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert rc == 2 and "a.json" in capsys.readouterr().err


def test_trace_replay_keeps_send_times_lengths_and_a_shared_prefix(openai_server, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("timestamp,input_length,output_length\n"
                     "1000,40,2\n1300,50,3\n1600,60,4\n")
    sent_before = len(openai_server.received)
    out = tmp_path / "trace-run"
    rc = main(["run", "--url", openai_server.url, "--model", "tiny", "--trace-file", str(trace),
               "--trace-time-unit", "ms", "--shared-prefix-len", "30", "--no-progress",
               "--output-dir", str(out)])
    assert rc == 0
    records = load_run(out / "run.json").records
    assert [(r.prompt_tokens, r.prompt_tokens_source) for r in records] == \
        [(40, "usage"), (50, "usage"), (60, "usage")]
    assert [r.output_tokens for r in records] == [2, 3, 4]
    assert [r.start_time for r in records] == pytest.approx([0.0, 0.3, 0.6], abs=0.1)
    prompts = [b["prompt"].split() for b in openai_server.received[sent_before:]]
    assert len({tuple(p[:30]) for p in prompts}) == 1 and len({tuple(p) for p in prompts}) == 3
