"""The shared-prefix workload against kvrelay's real gateway and engine: the load tester
records each request's usage.prompt_tokens_details.cached_tokens and reports their sum; the
gateway's Prometheus metrics carry the worker's prefix_cache_queries / _hits."""

from __future__ import annotations

import httpx

from loadtest.cli import main
from loadtest.report import load_run
from tests.router.conftest import engine_config, served_gateway
from workers.actors.colocated_worker import ColocatedWorker
from workers.actors.worker_base import WorkerSpec


def test_shared_prefix_workload_reports_cached_tokens(tiny_model_dir, tmp_path):
    worker = ColocatedWorker(WorkerSpec("lt-prefix-0", engine_config(tiny_model_dir)))
    try:
        with served_gateway(worker, tiny_model_dir) as served:
            out = tmp_path / "prefix"
            rc = main(["run", "--url", served.url, "--model", "tiny", "--prompt-format",
                       "token_ids", "--vocab-size", "300", "--input-len", "60",
                       "--shared-prefix-len", "48", "--output-len", "2", "--num-requests", "6",
                       "--concurrency", "1", "--seed", "3", "--no-progress",
                       "--output-dir", str(out)])
            metrics = httpx.get(served.url + "/metrics", timeout=30).text
        assert rc == 0
        doc = load_run(out / "run.json")
        assert all(r.ok and r.cached_tokens is not None for r in doc.records)
        # One at a time: the first computes the 48-token prefix (6 blocks of 8), the others
        # find it cached.
        assert sorted(r.cached_tokens for r in doc.records) == [0] + [48] * 5
        assert doc.summary.cached_tokens == 240
        assert doc.summary.cached_ratio == 240 / 360
        assert "cached prompt tokens: 240 (66.7% of the prompt tokens)" in \
            (out / "summary.md").read_text()
        hits = [line for line in metrics.splitlines()
                if line.startswith("kvrelay_worker_prefix_cache_hits{")]
        assert hits and float(hits[0].split()[-1]) >= 240
    finally:
        worker.shutdown()
