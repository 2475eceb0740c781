"""Benchmarks: pytest-benchmark suites (one file per op) and the one-call GPU report.

`bench/common.py` holds the measuring (timers, ceilings, checks, results);
`bench/cases.py` the comparisons themselves, shared by the suites and `bench/report.py`.
"""
