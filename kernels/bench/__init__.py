"""Kernel benchmarks and the copy-bandwidth measurement every benchmark is held against."""
