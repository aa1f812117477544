"""Cluster benchmarks on GPUs: KV transfer vs raw NCCL, 1P+1D vs colocated, one-GPU serve."""
