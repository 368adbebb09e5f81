"""Benchmarks run by `kvtier bench ...`."""
