"""How we measure, shared by the pytest-benchmark suites and `bench/report.py`.

- `Case`: one comparison (ours against a PyTorch baseline, several variants), with
  the work it does (FLOPs, bytes, tokens), its inputs rotated so that timing never
  runs out of a warm L2, and a correctness check that runs before any timing.
- Timers: `time_call` (CUDA events around each call, the GPU kept busy by a sleep
  kernel queued before it so CPU launch cost is not counted; the report uses it)
  and `run_benchmark` (pytest-benchmark rounds of back-to-back calls ending in a
  `torch.cuda.synchronize()`, i.e. wall time as a training loop sees it).
- `measure_ceilings`: the device-to-device copy bandwidth and the bf16 matmul rate,
  measured in the same session, against which throughputs are reported.
- `Result` / `Registry`: what was measured, its ratio to the baseline measured in
  the same run, and the summary table.

Work counts follow GUIDE.md section 3: attention FLOPs as FlashAttention counts
them (forward 4*B*H*T*T*D, halved when causal; backward 2.5x forward), training
FLOPs per token as llm.c counts them (6N + 6*L*C*T).
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# Nominal H100 rates, used for the floors in NOTES.md and when no ceiling was measured.
H100_COPY_BYTES_PER_S = 3.0e12
H100_BF16_FLOPS_PER_S = 800e12
L2_BYTES = 50 * 2 ** 20  # H100's L2; inputs smaller than twice this are rotated

TARGET_ROUND_S = 2e-3     # back-to-back calls per pytest-benchmark round: at least this long
BENCH_BUDGET_S = 0.4      # wall time of the timed rounds of one pytest benchmark (roughly)


class Unavailable(Exception):
    """A variant cannot run here (kernel module missing, SDPA backend unsupported, ...)."""


class CheckFailed(AssertionError):
    """A variant's outputs disagree with the reference beyond the baseline's own error."""


# --------------------------------------------------------------------------
# Work counts
# --------------------------------------------------------------------------

def attention_flops(B: int, H: int, T: int, D: int, causal: bool, kind: str) -> float:
    """FLOPs of one attention call as FlashAttention counts them; kind: fwd, bwd or fwdbwd."""
    fwd = 4.0 * B * H * T * T * D
    if causal:
        fwd /= 2
    factors = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
    if kind not in factors:
        raise ValueError(f"attention_flops: kind must be fwd, bwd or fwdbwd, got {kind!r}")
    return fwd * factors[kind]


def matmul_flops(M: int, N: int, K: int) -> float:
    return 2.0 * M * N * K


def gpt_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token, llm.c's count: 6N for the matmuls of forward and
    backward, 6*L*C*T for attention (12*L*C*T halved by the causal mask)."""
    return 6.0 * n_params + 6.0 * n_layer * n_embd * seq_len


def rotation_count(bytes_per_set: int, limit: int = 8) -> int:
    """Input sets to rotate through so that consecutive calls do not find their
    inputs in L2: enough to span twice the L2, at most `limit`."""
    if bytes_per_set <= 0:
        return 1
    return max(1, min(limit, math.ceil(2 * L2_BYTES / bytes_per_set)))


# --------------------------------------------------------------------------
# Comparing outputs
# --------------------------------------------------------------------------

def flatten(outs) -> list:
    """Outputs (a tensor, a number, or nested tuples/lists of them) as a flat list."""
    if isinstance(outs, (tuple, list)):
        return [y for x in outs for y in flatten(x)]
    if isinstance(outs, torch.Tensor):
        return [outs.detach()]
    if isinstance(outs, (int, float)):
        return [torch.tensor(float(outs))]
    if outs is None:
        return [None]
    raise TypeError(f"flatten: cannot compare outputs of type {type(outs).__name__}")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (fp32 arithmetic); inf if actual has NaN/inf."""
    if actual.shape != expected.shape:
        raise CheckFailed(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.numel() == 0:
        return 0.0
    a = actual.float()
    e = expected.to(a.device).float()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


def compare(outs, baseline, reference, factor: float = 2.0, floor: float = 1e-4) -> tuple[bool, str, float]:
    """Judge outputs by comparison (GUIDE.md): each output's error against the
    reference must be at most `factor` times the baseline's own error (or `floor`,
    whichever is larger). Returns (ok, detail, worst error)."""
    ours, base, ref = flatten(outs), flatten(baseline), flatten(reference)
    if not len(ours) == len(base) == len(ref):
        return False, f"{len(ours)} outputs, baseline {len(base)}, reference {len(ref)}", math.inf
    worst, details, ok = 0.0, [], True
    for i, (o, b, r) in enumerate(zip(ours, base, ref)):
        if r is None:
            if o is not None:
                return False, f"output {i}: expected None", math.inf
            continue
        if o is None:
            return False, f"output {i}: missing", math.inf
        err, base_err = rel_err(o, r), rel_err(b, r)
        allowed = factor * max(base_err, floor)
        worst = max(worst, err)
        if not err <= allowed:
            ok = False
            details.append(f"output {i}: error {err:.2e} > {allowed:.2e} "
                           f"({factor}x baseline's {base_err:.2e})")
    return ok, "; ".join(details) or f"max error {worst:.2e}", worst


# --------------------------------------------------------------------------
# A comparison
# --------------------------------------------------------------------------

def _detached(outs):
    if isinstance(outs, (tuple, list)):
        return type(outs)(_detached(x) for x in outs)
    if isinstance(outs, torch.Tensor):
        return outs.detach().clone()
    return outs


@dataclass
class Case:
    """One comparison: `make(variant)` returns `fn(i)` that runs the op once on input
    set i (0 <= i < n_inputs) and returns its outputs. `make` raises `Unavailable`
    for a variant that cannot run here. The baseline is one of `variants`."""

    group: str
    params: str
    variants: list[str]
    baseline: str
    make: Callable[[str], Callable[[int], Any]]
    n_inputs: int = 1
    reference: Callable[[], Any] | None = None  # high-precision outputs on input set 0
    # Custom check of a variant's outputs on input set 0 (raises CheckFailed); when
    # absent, outputs are judged against `reference` relative to the baseline's error.
    verify: Callable[[str, Any], None] | None = None
    flops: float = 0.0         # per call
    bytes: float = 0.0         # least bytes one call must move
    tokens: int = 0            # tokens per call (training, tokenizers, loaders)
    flops_per_token: float = 0.0
    track_memory: bool = False
    tol_factor: float = 2.0
    tol_floor: float = 1e-4
    device: str = "cuda"
    meta: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.baseline not in self.variants:
            raise ValueError(f"Case {self.group}: baseline {self.baseline!r} is not among {self.variants}")

    @property
    def key(self) -> tuple[str, str]:
        return self.group, self.params

    def reference_outputs(self):
        if "ref" not in self._cache:
            self._cache["ref"] = _detached(self.reference())
        return self._cache["ref"]

    def baseline_outputs(self, fn=None):
        if "base" not in self._cache:
            fn = fn if fn is not None else self.make(self.baseline)
            self._cache["base"] = _detached(fn(0))
        return self._cache["base"]

    def check(self, variant: str, fn) -> str:
        """Run `fn` once on input set 0 (the first call is also its warm-up: compiling,
        autotuning) and judge its outputs. Returns a short verdict; raises CheckFailed."""
        outs = fn(0)
        sync(self.device)
        if self.verify is not None:
            self.verify(variant, outs)
            return "pass"
        if self.reference is None:
            raise ValueError(f"Case {self.group}: neither verify nor reference given")
        ref = self.reference_outputs()
        if variant == self.baseline:
            self._cache.setdefault("base", _detached(outs))
            base = self._cache["base"]
            bad = [i for i, t in enumerate(flatten(outs))
                   if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all())]
            if bad:
                raise CheckFailed(f"{self.group} {self.params} {variant}: non-finite output(s) {bad}")
            errs = [rel_err(b, r) for b, r in zip(flatten(base), flatten(ref)) if r is not None]
            return f"pass (baseline, max error {max(errs, default=0.0):.2e})"
        base = self.baseline_outputs()
        ok, detail, _ = compare(outs, base, ref, self.tol_factor, self.tol_floor)
        if not ok:
            raise CheckFailed(f"{self.group} {self.params} {variant}: {detail}")
        return f"pass ({detail})"

    def rotating(self, fn) -> Callable[[], Any]:
        """A zero-argument call that runs `fn` on the next input set each time."""
        state = [0]
        n = self.n_inputs

        def call():
            i = state[0]
            state[0] = (i + 1) % n
            return fn(i)
        return call


# --------------------------------------------------------------------------
# Timers
# --------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _sleep_cycles_per_s() -> float | None:
    """Clock cycles per second of `torch.cuda._sleep`, measured once per call of time_call's caller."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sleep(1000)  # the first launch loads the kernel
    start.record()
    sleep(2_000_000)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    return 2_000_000 / seconds if seconds > 0 else None


def estimate_seconds(call, device, n: int = 3) -> float:
    """Median wall time of a few synchronised calls: a first guess for sizing loops."""
    samples = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        call()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def time_call(call, device="cuda", *, warmup: int = 2, min_time: float = 0.25,
              min_reps: int = 5, max_reps: int = 500) -> list[float]:
    """Seconds per call, one sample per repetition.

    On CUDA each call sits between two events; before it a sleep kernel, longer
    than the call's CPU cost, lets the CPU queue the call's launches while the GPU
    waits, so the events time the GPU's work and not the launch overhead. On CPU,
    perf_counter around each call.
    """
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        call()
    est = max(estimate_seconds(call, device, n=2), 1e-6)
    reps = int(min(max_reps, max(min_reps, min_time / est)))
    samples = []
    if not cuda:
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            samples.append(time.perf_counter() - t0)
        return samples
    cycles_per_s = _sleep_cycles_per_s()
    pad_cycles = int(cycles_per_s * min(max(2 * est, 50e-6), 20e-3)) if cycles_per_s else 0
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        if pad_cycles:
            torch.cuda._sleep(pad_cycles)
        s.record()
        call()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def peak_memory(call, device="cuda") -> tuple[float, float, float]:
    """(peak bytes allocated during one call, that peak minus what was allocated
    before, peak bytes reserved).

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


# --------------------------------------------------------------------------
# Ceilings
# --------------------------------------------------------------------------

@dataclass
class Ceilings:
    copy_bytes_per_s: float     # device-to-device copy, bytes read + written
    matmul_flops_per_s: float   # bf16 8192^3 matmul on random data

    def as_dict(self) -> dict:
        return {"copy_GB_per_s": self.copy_bytes_per_s / 1e9,
                "bf16_matmul_TFLOP_per_s": self.matmul_flops_per_s / 1e12}


def measure_ceilings(device="cuda", copy_bytes: int = 1 << 30, n: int = 8192) -> Ceilings:
    """Copy bandwidth (a `copy_` of `copy_bytes`, counting read + write) and the bf16
    matmul rate at n^3 with random data, on this device, now."""
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.randn(copy_bytes // 4, device=device, generator=gen)
    dst = torch.empty_like(src)
    t_copy = statistics.median(time_call(lambda: dst.copy_(src), device, min_time=0.3))
    del src, dst
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    t_mm = statistics.median(time_call(lambda: torch.matmul(a, b, out=c), device, min_time=0.5))
    return Ceilings(copy_bytes_per_s=2 * copy_bytes / t_copy,
                    matmul_flops_per_s=matmul_flops(n, n, n) / t_mm)


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------

@dataclass
class Result:
    group: str
    params: str
    variant: str
    baseline: str
    seconds: float | None = None           # per call
    check: str = ""                        # "pass ...", "FAIL: ...", "error: ...", "skipped: ..."
    metrics: dict = field(default_factory=dict)
    speedup: float | None = None           # baseline seconds / seconds (same run)
    meta: dict = field(default_factory=dict)  # the case's shape fields and facts (graphs on, ...)

    @property
    def ok(self) -> bool:
        return self.seconds is not None and self.check.startswith("pass")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def metrics_for(case: Case, seconds: float, ceilings: Ceilings | None) -> dict:
    """Throughput that matters for this case and its share of the measured ceiling."""
    m: dict[str, float] = {"ms": seconds * 1e3}
    if case.meta.get("per_call"):
        m[f"{case.meta['per_call']}_per_s"] = 1.0 / seconds
    if case.tokens:
        m["tokens_per_s"] = case.tokens / seconds
        if case.flops_per_token:
            achieved = case.flops_per_token * case.tokens / seconds
            m["TFLOP_per_s"] = achieved / 1e12
            if ceilings:
                m["MFU_pct"] = 100 * achieved / ceilings.matmul_flops_per_s
    if case.flops:
        m["TFLOP_per_s"] = case.flops / seconds / 1e12
        if ceilings:
            m["pct_of_ceiling"] = 100 * case.flops / seconds / ceilings.matmul_flops_per_s
            m["floor_ms"] = 1e3 * max(case.flops / ceilings.matmul_flops_per_s,
                                      case.bytes / ceilings.copy_bytes_per_s)
    elif case.bytes:
        m["GB_per_s"] = case.bytes / seconds / 1e9
        if ceilings:
            m["pct_of_ceiling"] = 100 * case.bytes / seconds / ceilings.copy_bytes_per_s
            m["floor_ms"] = 1e3 * case.bytes / ceilings.copy_bytes_per_s
    return m


def throughput_text(metrics: dict) -> str:
    if "tokens_per_s" in metrics:
        s = f"{metrics['tokens_per_s']:,.0f} tok/s"
        if "batches_per_s" in metrics:
            s += f" ({metrics['batches_per_s']:,.0f} batches/s)"
        if "MFU_pct" in metrics:
            s += f", MFU {metrics['MFU_pct']:.1f}%"
        return s
    if "TFLOP_per_s" in metrics:
        return f"{metrics['TFLOP_per_s']:.1f} TFLOP/s"
    if "GB_per_s" in metrics:
        return f"{metrics['GB_per_s']:.3g} GB/s"
    if "batches_per_s" in metrics:
        return f"{metrics['batches_per_s']:,.0f} batches/s"
    return ""


class Registry:
    """Results of one session, keyed (group, params, variant)."""

    def __init__(self):
        self.results: dict[tuple[str, str, str], Result] = {}

    def add(self, result: Result) -> None:
        self.results[(result.group, result.params, result.variant)] = result

    def seconds(self, group: str, params: str, variant: str) -> float | None:
        r = self.results.get((group, params, variant))
        return r.seconds if r is not None and r.ok else None

    def __bool__(self) -> bool:
        return bool(self.results)

    def summary_lines(self) -> list[str]:
        rows = [("group", "params", "variant", "ms", "vs baseline", "throughput")]
        for r in sorted(self.results.values(), key=lambda r: (r.group, r.params, r.variant != r.baseline, r.variant)):
            ms = f"{r.seconds * 1e3:.4g}" if r.seconds is not None else "-"
            if r.variant == r.baseline:
                ratio = "baseline"
            elif r.speedup is not None:
                ratio = f"{r.speedup:.2f}x {r.baseline}"
            else:
                ratio = "-"
            rows.append((r.group, r.params, r.variant, ms, ratio, throughput_text(r.metrics)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


# --------------------------------------------------------------------------
# pytest-benchmark glue
# --------------------------------------------------------------------------

def run_benchmark(benchmark, case: Case, variant: str, registry: Registry | None = None,
                  ceilings: Ceilings | None = None, rounds: int | None = None) -> Result | None:
    """Check `variant` of `case`, then time it with pytest-benchmark (skipped with a
    reason when unavailable). Each round runs `inner` calls back to back and then
    waits for the device; extra_info gets per-call ms, throughput, share of the
    ceiling and the ratio to the baseline measured in this session."""
    import pytest

    benchmark.group = f"{case.group} {case.params}"
    try:
        fn = case.make(variant)
        verdict = case.check(variant, fn)
    except Unavailable as e:
        pytest.skip(f"{case.group} {variant}: {e}")
    except torch.cuda.OutOfMemoryError as e:
        pytest.skip(f"{case.group} {case.params} {variant}: out of GPU memory ({str(e).splitlines()[0]})")
    call = case.rotating(fn)
    if benchmark.disabled:
        # Plain `pytest`: the check above was the smoke test; run the call once more
        # through the fixture so it is exercised as timed.
        benchmark.pedantic(call, rounds=1, iterations=1)
        return None

    device = case.device
    est = max(estimate_seconds(call, device), 1e-7)
    inner = max(1, min(1000, math.ceil(TARGET_ROUND_S / est)))
    if rounds is None:
        rounds = int(min(50, max(5, BENCH_BUDGET_S / (inner * est))))

    def one_round():
        for _ in range(inner):
            call()
        sync(device)

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median / inner
    result = Result(case.group, case.params, variant, case.baseline, seconds, verdict,
                    metrics_for(case, seconds, ceilings))
    info = benchmark.extra_info
    info.update(result.metrics)
    info["calls_per_round"] = inner
    info["check"] = verdict
    info.update({k: v for k, v in case.meta.items() if isinstance(v, (bool, int, float, str))})
    if torch.device(device).type == "cuda":
        info["gpu_ms"] = 1e3 * statistics.median(time_call(call, device, warmup=0, min_time=0.1))
    if case.track_memory:
        peak, delta, reserved = peak_memory(call, device)
        result.metrics["peak_mem_MB"] = info["peak_mem_MB"] = peak / 2 ** 20
        result.metrics["extra_mem_MB"] = info["extra_mem_MB"] = delta / 2 ** 20
        result.metrics["peak_reserved_MB"] = info["peak_reserved_MB"] = reserved / 2 ** 20
    if registry is not None:
        if variant == case.baseline:
            base = seconds
        else:
            base = registry.seconds(case.group, case.params, case.baseline)
            if base is None:
                # Baseline not run in this session (e.g. -k filtered it out): measure it now,
                # the same way.
                base_call = case.rotating(case.make(case.baseline))
                base_call()
                base = statistics.median(time_rounds(base_call, device, inner, 5))
        result.speedup = base / seconds
        info[f"speedup_vs_{case.baseline}"] = result.speedup
        registry.add(result)
    return result


def time_rounds(call, device, inner: int, rounds: int) -> list[float]:
    """Per-call wall seconds of `rounds` rounds of `inner` back-to-back calls and a sync."""
    out = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            call()
        sync(device)
        out.append((time.perf_counter() - t0) / inner)
    return out


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------

def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else "unknown"


def environment() -> dict:
    """Versions and device of this run, for every result file."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_runtime": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
    }
    if cuda:
        env["driver"] = driver_version()
        props = torch.cuda.get_device_properties(0)
        env["sm_count"] = props.multi_processor_count
        env["memory_GiB"] = round(props.total_memory / 2 ** 30, 1)
        env["capability"] = f"{props.major}.{props.minor}"
    return env
