"""Benchmarks: datasets, judges, metrics, the experiment runner and reports."""
