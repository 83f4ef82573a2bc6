"""Benchmark data: the load stage's Arrow splits, and batching with dynamic padding."""
