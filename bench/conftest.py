"""Fixtures of the benchmark suites: the session's results registry, the measured
ceilings, and the table of ratios printed at the end of the run.

The root conftest decides Triton's mode and turns timing off unless
`--benchmark-only` is given (plain `pytest` runs each benchmark once, as a smoke test).
"""
import gc

import pytest
import torch

from bench.common import Registry, measure_ceilings

REGISTRY = pytest.StashKey[Registry]()
CEILINGS = pytest.StashKey[object]()


def pytest_configure(config):
    config.stash[REGISTRY] = Registry()


@pytest.fixture(scope="session")
def bench_registry(pytestconfig) -> Registry:
    """Results of this session; each benchmark's ratio is to the baseline recorded here."""
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
    tr.section("benchmark ratios (speedup = baseline time / time, same session)")
    if CEILINGS in config.stash:
        c = config.stash[CEILINGS].as_dict()
        tr.write_line(f"ceilings: copy {c['copy_GB_per_s']:.0f} GB/s, "
                      f"bf16 matmul {c['bf16_matmul_TFLOP_per_s']:.0f} TFLOP/s")
    for line in registry.summary_lines():
        tr.write_line(line)
