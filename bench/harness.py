"""The one measuring loop of the benchmarks: check -> time -> memory -> ratio.

Used by the pytest-benchmark suites (`run_benchmark`, one variant per test) and by
`bench/report.py` (`measure_case`, every variant of a comparison in one go). Both
go through `measure_variant`:

1. check: build the variant (`Case.make`; `Unavailable` when it cannot run here),
   run it once on input set 0 (also its warm-up: compiling, autotuning) and judge
   the outputs (`Case.check`; `CheckFailed` when wrong). A failing variant is not timed.
2. time: blocks of back-to-back calls ending in a device sync (`bench.timing`).
   A peer (any variant but the case's subject, "ours") is timed in paired rounds
   with the subject, so its ratio to the subject comes with a spread; the subject
   alone is timed by itself.
3. memory: the peak a call allocates (CUDA only, when the case tracks it).
4. ratio and metrics: per-call time, throughput, % of the ceiling measured in the
   same run, and for a peer its time / the subject's (median and interquartile
   range of the paired rounds: above 1 the subject is faster).
"""
from __future__ import annotations

import gc
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bench.results import Registry, Result, metrics_for
from bench.timing import (CPU_THREADS, Block, BenchmarkFixtureRounds, Ceilings, OwnRounds, Spread,
                          calls_per_block, cpu_threads, peak_memory, round_count, seconds_per_call,
                          sync)


class Unavailable(Exception):
    """A variant cannot run here (a package missing, an SDPA backend unsupported, ...)."""


class CheckFailed(AssertionError):
    """A variant's outputs disagree with the reference beyond the baseline's own error."""


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
    """Judge outputs by comparison, as flash-attention's tests judge bf16: each
    output's error against the reference must be at most `factor` times the
    baseline's own error (or `floor`, whichever is larger). Returns (ok, detail,
    worst error)."""
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


def _detached(outs):
    if isinstance(outs, (tuple, list)):
        return type(outs)(_detached(x) for x in outs)
    if isinstance(outs, torch.Tensor):
        return outs.detach().clone()
    return outs


# --------------------------------------------------------------------------
# A comparison
# --------------------------------------------------------------------------

@dataclass
class Case:
    """One comparison: `make(variant)` returns `fn(i)` that runs the op once on input
    set i (0 <= i < n_inputs) and returns its outputs; it raises `Unavailable` for a
    variant that cannot run here. `subject` is the variant the others (its peers) are
    compared with; `baseline` the variant whose own error against `reference` sets
    the tolerance of the others."""

    group: str
    params: str
    variants: list[str]
    baseline: str
    make: Callable[[str], Callable[[int], Any]]
    subject: str = "ours"
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
    threads: int | None = CPU_THREADS  # torch threads while measuring on CPU
    # Called after a variant's function is dropped (e.g. to reset torch.compile's caches).
    release: Callable[[str], None] | None = None
    meta: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for role, name in (("baseline", self.baseline), ("subject", self.subject)):
            if name not in self.variants:
                raise ValueError(f"Case {self.group}: {role} {name!r} is not among {self.variants}")

    @property
    def peers(self) -> list[str]:
        return [v for v in self.variants if v != self.subject]

    def reference_outputs(self):
        if "ref" not in self._cache:
            self._cache["ref"] = _detached(self.reference())
        return self._cache["ref"]

    def baseline_outputs(self):
        if "base" not in self._cache:
            fn = self.make(self.baseline)
            self._cache["base"] = _detached(fn(0))
            del fn
            self.released(self.baseline)
        return self._cache["base"]

    def released(self, variant: str) -> None:
        if self.release is not None:
            self.release(variant)

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
        try:
            base = self.baseline_outputs()
        except Unavailable as e:
            raise Unavailable(f"{variant} cannot be checked: the baseline {self.baseline} it is "
                              f"judged against cannot run here ({e})") from None
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
# The loop
# --------------------------------------------------------------------------

@dataclass
class Prepared:
    """A variant that passed its check, ready to time."""
    variant: str
    verdict: str
    block: Block


def prepare(case: Case, variant: str) -> Prepared:
    """Build and check `variant`, and size its timing block (raises Unavailable,
    CheckFailed, or whatever building or running it raised)."""
    fn = case.make(variant)
    verdict = case.check(variant, fn)
    call = case.rotating(fn)
    est = seconds_per_call(call, case.device)
    return Prepared(variant, verdict, Block(call, calls_per_block(est, case.device)))


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def measure_variant(case: Case, variant: str, *, ceilings: Ceilings | None = None,
                    driver=None, prepared: Prepared | None = None, subject: Prepared | None = None,
                    pair: bool = True, catch_errors: bool = False,
                    log: Callable[[str], None] = print,
                    predict: Callable[[Case, str], float | None] | None = None) -> Result:
    """Check, time, measure the memory of, and compare one variant of `case`.

    `driver` times the blocks (`OwnRounds` by default; `BenchmarkFixtureRounds`
    in the pytest suites). `prepared`: the variant already built and checked (it is
    then left alive for the caller). With `pair`, a peer is timed in paired rounds with the
    case's subject (`subject`, or prepared here; timed alone when the subject cannot
    run). The result's `check` says what happened: "pass ...", "skipped: <why>"
    (Unavailable, out of GPU memory), "FAIL: ..." (CheckFailed) and, with
    `catch_errors`, "error: ..." for anything else (otherwise it propagates).
    `predict(case, variant)`: a predicted time per call (bench/predict.py), kept in
    the metrics beside the measured one."""
    driver = driver if driver is not None else OwnRounds()
    dev = case.device
    r = Result(case.group, case.params, variant, case.subject,
               meta={k: v for k, v in case.meta.items() if isinstance(v, (bool, int, float, str))})
    with cpu_threads(dev, case.threads):
        try:
            me = prepared if prepared is not None else prepare(case, variant)
            r.check = me.verdict
            if variant == case.subject or not pair:
                subject = None
            elif subject is None:
                try:
                    subject = prepare(case, case.subject)
                except (Unavailable, CheckFailed) as e:
                    log(f"{case.group} {case.params}: {variant} timed alone; the subject "
                        f"{case.subject} cannot run ({first_line(e)})")
            block_s = seconds_per_call(me.block.call, dev, n=1) * me.block.inner
            if subject is None:
                samples = driver.solo(me.block, dev, round_count(block_s, dev))
            else:
                block_s += seconds_per_call(subject.block.call, dev, n=1) * subject.block.inner
                samples, theirs = driver.paired(me.block, subject.block, dev, round_count(block_s, dev))
                r.set_speedup(Spread.of([m / t for m, t in zip(samples, theirs)]))
                r.subject_seconds = Spread.of(theirs).median
            r.seconds = Spread.of(samples).median
            r.rounds, r.calls_per_round = len(samples), me.block.inner
            r.metrics = metrics_for(case, r.seconds, ceilings)
            predicted = predict(case, variant) if predict is not None else None
            if predicted is not None:
                r.metrics["predicted_ms"] = predicted * 1e3
            if case.track_memory:
                peak, delta, reserved = peak_memory(me.block.call, dev)
                r.metrics["peak_mem_MB"] = peak / 2 ** 20
                r.metrics["extra_mem_MB"] = delta / 2 ** 20
                r.metrics["peak_reserved_MB"] = reserved / 2 ** 20
        except Unavailable as e:
            r.check = f"skipped: {e}"
        except CheckFailed as e:
            r.check = f"FAIL: {e}"
        except torch.cuda.OutOfMemoryError as e:
            r.check, r.seconds = f"skipped: out of GPU memory ({first_line(e)})", None
        except Exception as e:  # noqa: BLE001 - the report keeps going; pytest re-raises
            if not catch_errors:
                raise
            log(traceback.format_exc())
            r.check, r.seconds = f"error: {first_line(e)}", None
        finally:
            me = None
            if prepared is None:
                case.released(variant)
    return r


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_case(build: Callable[[], Case], ceilings: Ceilings | None = None, section: str = "-",
                 log: Callable[[str], None] = print,
                 row: Callable[[Result], str] | None = None,
                 predict: Callable[[Case, str], float | None] | None = None) -> list[Result]:
    """Every variant of one comparison (the report's loop): the subject first, then
    each peer in paired rounds with it, the subject prepared once for all of them.
    Never raises: a comparison that cannot be built is one error row."""
    try:
        case = build()
    except Exception as e:  # noqa: BLE001 - one broken comparison must not end the report
        log(traceback.format_exc())
        return [Result(section, "-", "-", "-", check=f"error: {first_line(e)}")]
    with cpu_threads(case.device, case.threads):
        try:
            subject = prepare(case, case.subject)
        except Exception:  # noqa: BLE001 - the subject's own row below records why
            subject = None
    results = []
    for variant in [case.subject, *case.peers]:
        if variant == case.subject:
            r = measure_variant(case, variant, ceilings=ceilings, prepared=subject,
                                catch_errors=True, log=log, predict=predict)
        else:
            r = measure_variant(case, variant, ceilings=ceilings, subject=subject,
                                pair=subject is not None, catch_errors=True, log=log, predict=predict)
        free_memory()
        results.append(r)
        if row is not None:
            log(row(r))
    subject = None
    case.released(case.subject)
    del case
    free_memory()
    return results


# --------------------------------------------------------------------------
# pytest-benchmark glue
# --------------------------------------------------------------------------

def run_benchmark(benchmark, case: Case, variant: str, registry: Registry | None = None,
                  ceilings: Ceilings | None = None) -> Result | None:
    """One pytest-benchmark test: `variant` of `case` through `measure_variant`, its
    blocks timed by the fixture (per-call statistics in the tables), skipped with
    the reason when unavailable, failed when its check fails. Under plain `pytest`
    (timing disabled) the check is the smoke test."""
    import pytest

    benchmark.group = f"{case.group} {case.params}"
    if benchmark.disabled:
        with cpu_threads(case.device, case.threads):
            try:
                fn = case.make(variant)
                case.check(variant, fn)
            except Unavailable as e:
                pytest.skip(f"{case.group} {variant}: {e}")
            benchmark.pedantic(case.rotating(fn), rounds=1, iterations=1)
        case.released(variant)
        return None
    result = measure_variant(case, variant, ceilings=ceilings, driver=BenchmarkFixtureRounds(benchmark),
                             log=lambda s: None)
    if result.check.startswith("skipped: "):
        pytest.skip(f"{case.group} {variant}: {result.check.removeprefix('skipped: ')}")
    if result.check.startswith("FAIL: "):
        raise CheckFailed(result.check.removeprefix("FAIL: "))
    info = benchmark.extra_info
    info.update(result.metrics)
    info["check"] = result.check
    info["calls_per_round"] = result.calls_per_round
    info.update(result.meta)
    if result.subject_speedup is not None:
        info[f"{case.subject}_speedup"] = result.subject_speedup
        info[f"{case.subject}_speedup_iqr"] = [result.subject_speedup_q1, result.subject_speedup_q3]
        info[f"{case.subject}_ms_same_rounds"] = result.subject_seconds * 1e3
    if registry is not None:
        registry.add(result)
    return result
