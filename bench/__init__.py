"""Benchmarks: pytest-benchmark suites (one file per op), the one-call GPU report and
the training step's anatomy.

- `harness.py`: the one check -> time -> memory -> ratio loop, and `Case`;
- `work.py` (FLOP and byte counts), `timing.py` (blocks, paired rounds, ceilings),
  `results.py` (results, tables, environment): what the harness is built from;
- `cases.py`: the comparisons, ours beside its peers, shared by the suites and `report.py`;
- `anatomy.py`: what a training step launches and moves, counted on any machine.
"""
