"""Benchmarks of the fused LUFFY loss: run with `pytest benchmarks/ --benchmark` (see BENCHMARKS.md)."""
