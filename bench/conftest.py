"""Fixtures of the benchmark suites: the session's results registry, the measured
ceilings, and the tables printed at the end of a timed run (every row with its
ratio to ours and that ratio's spread, then ours beside the best peer).

The root conftest decides Triton's mode and turns timing off unless
`--benchmark-only` is given (plain `pytest` runs each benchmark once, as a smoke test).
"""
import gc

import pytest
import torch

from bench.results import Registry
from bench.timing import CPU_THREADS, measure_ceilings

REGISTRY = pytest.StashKey[Registry]()
CEILINGS = pytest.StashKey[object]()


def pytest_configure(config):
    config.stash[REGISTRY] = Registry()


@pytest.fixture(scope="session")
def bench_registry(pytestconfig) -> Registry:
    """Results of this session."""
    return pytestconfig.stash[REGISTRY]


@pytest.fixture(scope="session")
def ceilings(pytestconfig):
    """Copy bandwidth and bf16 matmul rate measured once in this session (None without
    CUDA, or when benchmarks are not being timed)."""
    if not torch.cuda.is_available() or pytestconfig.getoption("benchmark_disable", False):
        return None
    if CEILINGS not in pytestconfig.stash:
        pytestconfig.stash[CEILINGS] = measure_ceilings("cuda")
    return pytestconfig.stash[CEILINGS]


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """Each comparison allocates GBs; give them back before the next one."""
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    registry = config.stash.get(REGISTRY, None)
    if not registry:
        return
    tr = terminalreporter
    for title, lines in registry.sections.items():
        tr.section(title)
        for line in lines:
            tr.write_line(line)
    if not registry.results:
        return
    tr.section("benchmark ratios: how much faster or slower the subject is than each peer, median of "
               "paired rounds [interquartile range]")
    tr.write_line("ms/call: median over rounds of blocks of back-to-back calls ending in a device sync; "
                  f"CPU cases on {CPU_THREADS} torch thread(s)")
    if CEILINGS in config.stash:
        c = config.stash[CEILINGS].as_dict()
        tr.write_line(f"ceilings: copy {c['copy_GB_per_s']:.0f} GB/s, "
                      f"bf16 matmul {c['bf16_matmul_TFLOP_per_s']:.0f} TFLOP/s")
    for line in registry.summary_lines():
        tr.write_line(line)
    peers = registry.peer_lines()
    if peers:
        tr.write_line("")
        tr.write_line("ours beside the best peer:")
        for line in peers:
            tr.write_line(line)
