"""Load tester for any OpenAI-compatible endpoint. Talks to servers over HTTP only.

Entry points: `kvrelay loadtest {run,sweep,compare}` (loadtest/cli.py). Library use:
`benchmark.benchmark(RunConfig, Workload, slos, out_dir)` runs and writes run.json, summary.md
and latency_cdf.png; `runner.run(...)` returns the records only; `metrics.summarize(records,
duration_s, slos)` folds records into a Summary; `report.load_run(path)` reads a run back.
"""
