"""`python -m workers.bench.bench_engine`: offline engine throughput against transformers."""
