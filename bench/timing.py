"""How a call is timed: blocks of back-to-back calls, each ended by a device sync.

One method everywhere (the pytest-benchmark suites and `bench/report.py`):

- A *block* is `inner` calls back to back followed by `torch.cuda.synchronize()`
  (nothing on CPU), timed on the host clock. `inner` is chosen so that a block
  lasts at least `BLOCK_S` on this device: the sync and the timer cost a negligible
  share of it, and the GPU's queue stays full, so a kernel is timed by its work
  while a step that is bound by its launches shows that too (as a training loop
  sees it). The per-call time of a block is its time / `inner`.
- Two variants are compared in *paired rounds*: each round times one block of each,
  back to back, alternating which goes first, so that a slow spell of the machine
  (another process, a clock change) lands on both. The ratio is the median of the
  per-round ratios and its spread their interquartile range.
- On CPU the torch thread count is fixed while measuring (`cpu_threads`): with as
  many threads as cores, any other process makes the OpenMP workers wait for each
  other and a call's time jumps several-fold.
"""
from __future__ import annotations

import contextlib
import math
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

# Least wall time of one block, per device type.
BLOCK_S = {"cuda": 5e-3, "cpu": 20e-3}
MAX_CALLS_PER_BLOCK = 1000
MIN_ROUNDS = 7
MAX_ROUNDS = 60
# Wall time spent on the timed rounds of one measurement (both variants of a pair).
ROUNDS_BUDGET_S = {"cuda": 0.6, "cpu": 2.0}
# Torch threads while a CPU call is measured.
CPU_THREADS = 1


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def cpu_threads(device, n: int | None = CPU_THREADS):
    """Run with `n` torch threads when `device` is the CPU (restored afterwards)."""
    if torch.device(device).type != "cpu" or n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seconds_per_call(call: Callable[[], object], device, n: int = 3) -> float:
    """Median wall time of `n` single synchronised calls: a first guess for sizing blocks."""
    samples = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        call()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return max(statistics.median(samples), 1e-7)


def calls_per_block(est_seconds: float, device) -> int:
    target = BLOCK_S[torch.device(device).type]
    return max(1, min(MAX_CALLS_PER_BLOCK, math.ceil(target / est_seconds)))


def round_count(block_seconds: float, device, budget_s: float | None = None) -> int:
    """Rounds that fit the budget, within [MIN_ROUNDS, MAX_ROUNDS]."""
    budget = ROUNDS_BUDGET_S[torch.device(device).type] if budget_s is None else budget_s
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget / max(block_seconds, 1e-9))))


def time_block(call, inner: int, device) -> float:
    """Per-call seconds of one block: `inner` calls back to back, then a sync."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        call()
    sync(device)
    return (time.perf_counter() - t0) / inner


@dataclass
class Block:
    """A call and how many of it make one block."""
    call: Callable[[], object]
    inner: int


class OwnRounds:
    """Times blocks with `time_block` (the report's driver)."""

    def solo(self, block: Block, device, rounds: int) -> list[float]:
        time_block(block.call, block.inner, device)  # warm-up round
        return [time_block(block.call, block.inner, device) for _ in range(rounds)]

    def paired(self, block: Block, partner: Block, device, rounds: int) -> tuple[list[float], list[float]]:
        time_block(block.call, block.inner, device)
        time_block(partner.call, partner.inner, device)
        mine, theirs = [], []
        for r in range(rounds):
            if r % 2:
                mine.append(time_block(block.call, block.inner, device))
                theirs.append(time_block(partner.call, partner.inner, device))
            else:
                theirs.append(time_block(partner.call, partner.inner, device))
                mine.append(time_block(block.call, block.inner, device))
        return mine, theirs


class BenchmarkFixtureRounds:
    """Times blocks through pytest-benchmark's `pedantic`, so that its tables hold
    per-call statistics of the variant under test: `iterations` = calls per block,
    the sync ending each block inside the timed region. The partner's block of each
    round runs in pedantic's teardown, right after the timed block."""

    def __init__(self, benchmark):
        self.benchmark = benchmark

    @staticmethod
    def _synced(block: Block, device):
        count = [0]

        def call():
            block.call()
            count[0] += 1
            if count[0] == block.inner:  # the block's last call: wait for the device
                sync(device)
        return call, count

    def solo(self, block: Block, device, rounds: int) -> list[float]:
        call, count = self._synced(block, device)

        def reset():
            count[0] = 0
        self.benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=block.inner,
                                teardown=reset)
        return list(self.benchmark.stats.stats.data)

    def paired(self, block: Block, partner: Block, device, rounds: int) -> tuple[list[float], list[float]]:
        call, count = self._synced(block, device)
        theirs: list[float] = []

        def partner_block():
            count[0] = 0
            theirs.append(time_block(partner.call, partner.inner, device))
        self.benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=block.inner,
                                teardown=partner_block)
        mine = list(self.benchmark.stats.stats.data)
        # The first teardown follows the warm-up round, the last one pedantic's extra
        # call for the result: neither belongs to a timed round.
        return mine, theirs[1:1 + len(mine)]


@dataclass
class Spread:
    """The median of samples and their interquartile range."""
    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, samples: list[float]) -> "Spread":
        if not samples:
            raise ValueError("Spread.of: no samples")
        if len(samples) == 1:
            return cls(samples[0], samples[0], samples[0])
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(statistics.median(samples), q1, q3)

    def text(self, fmt: str = "{:.2f}") -> str:
        return f"{fmt.format(self.median)}x [{fmt.format(self.q1)}-{fmt.format(self.q3)}]"


def peak_memory(call, device="cuda") -> tuple[float, float, float]:
    """(peak bytes allocated during one call, that peak minus what was allocated
    before, peak bytes reserved); NaNs off CUDA.

    A replayed CUDA graph keeps its activations in the graph's private pool, which
    `memory_allocated` does not count but `memory_reserved` does: compare training
    steps (graphed against eager) by the reserved peak, measured after emptying the
    allocator's cache so that it holds only what the call needs.
    """
    if torch.device(device).type != "cuda":
        return math.nan, math.nan, math.nan
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    del out
    return float(peak), float(peak - before), float(reserved)


@dataclass
class Ceilings:
    copy_bytes_per_s: float     # device-to-device copy, bytes read + written
    matmul_flops_per_s: float   # bf16 n^3 matmul on random data

    def as_dict(self) -> dict:
        return {"copy_GB_per_s": self.copy_bytes_per_s / 1e9,
                "bf16_matmul_TFLOP_per_s": self.matmul_flops_per_s / 1e12}


def measure_ceilings(device="cuda", copy_bytes: int = 1 << 30, n: int = 8192) -> Ceilings:
    """Copy bandwidth (a `copy_` of `copy_bytes`, counting read + write) and the bf16
    matmul rate at n^3 with random data, on this device, now, timed as every call is."""
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.randn(copy_bytes // 4, device=device, generator=gen)
    dst = torch.empty_like(src)
    copy = functools.partial(dst.copy_, src)
    t_copy = statistics.median(OwnRounds().solo(Block(copy, calls_per_block(
        seconds_per_call(copy, device), device)), device, MIN_ROUNDS))
    del copy, src, dst
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    mm = lambda: torch.matmul(a, b, out=c)  # noqa: E731
    t_mm = statistics.median(OwnRounds().solo(Block(mm, calls_per_block(
        seconds_per_call(mm, device), device)), device, MIN_ROUNDS))
    return Ceilings(copy_bytes_per_s=2 * copy_bytes / t_copy,
                    matmul_flops_per_s=2.0 * n ** 3 / t_mm)
