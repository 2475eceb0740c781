"""Session decisions for tests/ and bench/ alike, made before any kernel module is imported.

- Triton's mode: with a CUDA device the kernels are compiled; without one they run
  in Triton's CPU interpreter (`TRITON_INTERPRET=1`). The interpreter flag is read
  when `@triton.jit` decorates a function, so it is set here, at the top of the root
  conftest, which pytest imports before any test or benchmark module.
- The `gpu` marker: on a machine with CUDA the gpu-marked tests run first (a run cut
  short still has their verdicts); without CUDA they are skipped with one reason.
  The marker alone decides; by convention a test in tests/ that needs a GPU is
  also named `test_gpu_*` (a parametrized test keeps its name and marks the cases
  that need one; the benchmark suites' GPU groups are named for what they time).
- Benchmarks: plain `pytest` runs each benchmark once as a smoke test; only
  `pytest --benchmark-only` spends time timing.
- The short summary lists failures and errors one by one, and skips one line per
  reason ("N skipped: reason"); `--skip-locations` restores pytest's per-location list.

The GPT-2 tokenizer tests need tiktoken's gpt2 files: online they are downloaded
once; offline, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache of them
(the tests that need them skip with that advice otherwise).
"""
import os


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

GPU_SKIP_REASON = "needs a CUDA GPU; this machine has none"
BENCHMARK_COLUMNS = ("median", "iqr", "ops", "rounds", "iterations")
_FOLD_SKIPS = pytest.StashKey[bool]()


def pytest_addoption(parser):
    parser.getgroup("general").addoption(
        "--skip-locations", action="store_true", default=False,
        help="list skipped tests by location (pytest's own -rs) instead of one line per reason")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped with a reason on CPU)")
    if config.pluginmanager.hasplugin("benchmark") and hasattr(config.option, "benchmark_only"):
        if not config.option.benchmark_only:
            config.option.benchmark_disable = True
        if not any(arg.startswith("--benchmark-columns") for arg in config.invocation_params.args):
            # pytest-benchmark's ten default columns run ~220 characters wide; these
            # say what a per-call time needs (--benchmark-columns chooses others).
            config.option.benchmark_columns = list(BENCHMARK_COLUMNS)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    """Take skips out of pytest's per-location summary; `pytest_terminal_summary`
    below lists them by reason instead."""
    config = session.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or config.getoption("skip_locations"):
        return
    if "s" in reporter.reportchars:
        reporter.reportchars = reporter.reportchars.replace("s", "")
        config.stash[_FOLD_SKIPS] = True


def skip_reasons(reports) -> list[tuple[int, str]]:
    """(count, reason) of skip reports, most frequent first."""
    counts: dict[str, int] = {}
    for rep in reports:
        longrepr = getattr(rep, "longrepr", None)
        if isinstance(longrepr, tuple) and len(longrepr) == 3:
            reason = str(longrepr[2])
        else:
            reason = str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        counts[reason] = counts.get(reason, 0) + 1
    return sorted(((n, r) for r, n in counts.items()), key=lambda nr: (-nr[0], nr[1]))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # The outermost wrapper: these lines follow the terminal reporter's short
    # summary (failures and errors, one line each).
    result = yield
    if config.stash.get(_FOLD_SKIPS, False):
        skipped = terminalreporter.stats.get("skipped", [])
        if skipped:
            terminalreporter.write_sep("=", "skipped, by reason", yellow=True)
            for n, reason in skip_reasons(skipped):
                terminalreporter.write_line(f"{n} skipped: {reason}")
    return result


def pytest_report_header(config):
    try:
        import numpy
        import triton
    except ImportError as e:
        return f"kernels: not runnable here ({e})"
    mode = "compiled for the GPU" if HAS_CUDA else "Triton's CPU interpreter"
    lines = [f"kernels: {mode} (triton {triton.__version__}, numpy {numpy.__version__})"]
    if not HAS_CUDA:
        from gpt2_kernels._common import interpreter_problem
        problem = interpreter_problem()
        if problem:
            lines.append(f"kernels: every kernel test will fail: {problem}")
    return lines


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        # The gpu-marked checks first (a stable sort keeps each group's order).
        items.sort(key=lambda item: item.get_closest_marker("gpu") is None)
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
