"""Decides, before any kernel module is imported, how Triton runs in this session.

With a CUDA device the kernels are compiled; without one they run in Triton's
CPU interpreter (`TRITON_INTERPRET=1`). The interpreter flag is read when
`@triton.jit` decorates a function, so it must be set here, at the top of the
root conftest, which pytest imports before any test or benchmark module (this
root file serves both `tests/` and `bench/`).
"""
import os
import pathlib


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tiktoken's cache for the gpt2 encoding lies beside the clone on these
# offline machines; use it unless the user pointed somewhere else.
_SHARED_TIKTOKEN = pathlib.Path(__file__).resolve().parent.parent / "shared" / "tiktoken"
if _SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_SHARED_TIKTOKEN))

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped with a reason on CPU)")
    # Plain `pytest` runs each benchmark once as a smoke test; only
    # `pytest --benchmark-only` spends time timing.
    if config.pluginmanager.hasplugin("benchmark") and hasattr(config.option, "benchmark_only"):
        if not config.option.benchmark_only:
            config.option.benchmark_disable = True


def pytest_report_header(config):
    try:
        import numpy
        import triton
    except ImportError as e:
        return f"kernels: not runnable here ({e})"
    mode = "compiled for the GPU" if HAS_CUDA else "Triton's CPU interpreter"
    lines = [f"kernels: {mode} (triton {triton.__version__}, numpy {numpy.__version__})"]
    if not HAS_CUDA:
        from kernels._common import interpreter_problem
        problem = interpreter_problem()
        if problem:
            lines.append(f"kernels: every kernel test will fail: {problem}")
    return lines


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        # The GPU-only checks first (a stable sort keeps each group's order): a run
        # cut short by a deadline, as a lent machine's is, still has their verdicts.
        items.sort(key=lambda item: "gpu" not in item.keywords)
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
