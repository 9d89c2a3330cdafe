"""Benchmark logic behind `scripts/bench_*.py` (importable and testable)."""
