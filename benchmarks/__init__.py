"""Benchmarks as suites, one per question of BENCHMARKS.md: ``python -m benchmarks --list``."""
