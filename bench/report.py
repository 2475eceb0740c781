"""The one-call GPU report: every comparison, its check, its ceiling, in one run.

    python -m bench.report [--out DIR] [--quick] [--budget SECONDS] [--only SECTION]

Measures the ceilings first (device-to-device copy bandwidth, bf16 matmul rate at
8192^3), then runs each comparison of `bench.cases.gpu_plan`: for every variant
a correctness check against the reference (recorded pass/FAIL; a failing variant
is not timed), then CUDA-event timing (`bench.common.time_call`). One comparison
that fails (an OOM, a compile error) becomes an error row; the rest continue.
Comparisons left when the time budget is spent become "skipped" rows.

Writes to bench/results/<gpu-name-slug>-<YYYY-MM-DD>/ (or --out): results.json
(with the configuration each autotuned kernel chose for each key), results.md (the
table with versions and ceilings), attention_tflops.png and training_tokens_per_s.png.
The tables are rewritten after every comparison, so a run stopped from outside
keeps what it measured; an interrupt (Ctrl-C, SIGINT) skips the comparisons left and
writes the outputs. Exit status: 2 without CUDA, 130 when interrupted, 1 if any check
failed, else 0.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import statistics
import sys
import time
import traceback

import torch

from bench.common import (Ceilings, CheckFailed, Result, Unavailable, environment, measure_ceilings,
                          metrics_for, peak_memory, slug, throughput_text, time_call)
from engine.fileio import atomic_write

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_BUDGET_S = 420  # the whole run stays under 8 minutes with the ceilings and plots


def default_out_dir(env: dict) -> pathlib.Path:
    day = datetime.date.today().isoformat()
    return ROOT / "results" / f"{slug(env.get('device', 'unknown'))}-{day}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_case(section: str, build, ceilings: Ceilings | None, log=print) -> list[Result]:
    """Check and time every variant of one comparison, baseline first. Never raises."""
    try:
        case = build()
    except Exception as e:  # noqa: BLE001 - one broken comparison must not end the report
        log(traceback.format_exc())
        return [Result(section, "-", "-", "-", check=f"error: {_first_line(e)}")]
    results = []
    base_seconds = None
    order = [case.baseline] + [v for v in case.variants if v != case.baseline]
    for variant in order:
        r = Result(case.group, case.params, variant, case.baseline)
        fn = None
        try:
            fn = case.make(variant)
            r.check = case.check(variant, fn)
            call = case.rotating(fn)
            r.seconds = statistics.median(time_call(call, case.device))
            r.metrics = metrics_for(case, r.seconds, ceilings)
            if case.track_memory:
                peak, delta, reserved = peak_memory(call, case.device)
                r.metrics["peak_mem_MB"] = peak / 2 ** 20
                r.metrics["extra_mem_MB"] = delta / 2 ** 20
                r.metrics["peak_reserved_MB"] = reserved / 2 ** 20
        except Unavailable as e:
            r.check = f"skipped: {e}"
        except CheckFailed as e:
            r.check = f"FAIL: {e}"
        except Exception as e:  # noqa: BLE001
            log(traceback.format_exc())
            r.check = f"error: {_first_line(e)}"
            r.seconds = None
        finally:
            del fn
            if variant == "torch-compile":
                torch._dynamo.reset()
            _free_memory()
        r.meta = {k: v for k, v in case.meta.items() if isinstance(v, (bool, int, float, str))}
        if variant == case.baseline and r.ok:
            base_seconds = r.seconds
        if r.ok and base_seconds:
            r.speedup = base_seconds / r.seconds
        results.append(r)
        log(format_row(r))
    del case
    _free_memory()
    return results


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

COLUMNS = ("op", "shape", "variant", "ms", "baseline ms", "speedup", "throughput", "% of ceiling", "check")


def _memory_text(m: dict) -> str:
    if "peak_mem_MB" not in m:
        return ""
    text = f", peak {m['peak_mem_MB']:,.0f} MB"
    if "peak_reserved_MB" in m:  # what a graphed step's private pool shows up in
        text += f" ({m['peak_reserved_MB']:,.0f} MB reserved)"
    return text


def _cells(r: Result, base_ms: float | None) -> tuple[str, ...]:
    m = r.metrics
    pct = m.get("MFU_pct", m.get("pct_of_ceiling"))
    return (r.group, r.params, r.variant,
            f"{r.seconds * 1e3:.4g}" if r.seconds is not None else "-",
            f"{base_ms:.4g}" if base_ms is not None else "-",
            f"{r.speedup:.2f}x" if r.speedup is not None else "-",
            throughput_text(m) + _memory_text(m),
            f"{pct:.1f}%" if pct is not None else "-",
            r.check)


def format_row(r: Result) -> str:
    return " | ".join(_cells(r, None))


def table_rows(results: list[Result]) -> list[tuple[str, ...]]:
    base = {(r.group, r.params): r.seconds * 1e3 for r in results
            if r.variant == r.baseline and r.seconds is not None}
    return [_cells(r, base.get((r.group, r.params))) for r in results]


def text_table(results: list[Result]) -> str:
    rows = [COLUMNS] + [tuple(c if len(c) <= 60 else c[:57] + "..." for c in row)
                        for row in table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def markdown(env: dict, ceilings: Ceilings | None, results: list[Result], args: dict) -> str:
    lines = [f"# Benchmark report: {env.get('device')} ({env.get('date')})", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    if ceilings is not None:
        c = ceilings.as_dict()
        lines.append(f"- ceilings measured in this run: copy {c['copy_GB_per_s']:.0f} GB/s "
                     f"(read + write), bf16 matmul {c['bf16_matmul_TFLOP_per_s']:.0f} TFLOP/s (8192^3)")
    lines.append(f"- options: {args}")
    lines += ["", "speedup = baseline ms / ms in this run; % of ceiling = throughput against the "
              "measured copy bandwidth (memory-bound ops) or matmul rate (compute-bound ops; MFU "
              "for training, 6N + 6LCT FLOPs per token).", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for row in table_rows(results):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(lines) + "\n"


def plot_attention(results: list[Result], path: pathlib.Path) -> bool:
    points: dict[tuple[str, str, int], list[tuple[int, float]]] = {}
    for r in results:
        if not r.group.startswith("attention-") or "T" not in r.meta or "TFLOP_per_s" not in r.metrics:
            continue
        kind = r.group.split("-", 1)[1]
        points.setdefault((kind, r.variant, r.meta["D"]), []).append((r.meta["T"], r.metrics["TFLOP_per_s"]))
    if not points:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = sorted({k for k, _, _ in points})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for (k, variant, d), pts in sorted(points.items()):
            if k != kind:
                continue
            pts = sorted(set(pts))
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=f"{variant} D={d}",
                    linestyle="-" if variant == "ours" else "--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"causal attention {kind}, bf16")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_training(results: list[Result], path: pathlib.Path) -> bool:
    bars = [(f"{r.variant}\n{r.params.split(' ', 1)[1] if ' ' in r.params else r.params}",
             r.metrics["tokens_per_s"]) for r in results
            if r.group == "train-step" and "tokens_per_s" in r.metrics]
    if not bars:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(bars)), 4.5))
    ax.bar(range(len(bars)), [v for _, v in bars], color="tab:blue")
    ax.set_xticks(range(len(bars)), [n for n, _ in bars], fontsize=7)
    ax.set_ylabel("tokens / s")
    ax.set_title("GPT-2 124M training step")
    for i, (_, v) in enumerate(bars):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def autotune_choices() -> dict[str, list[dict]]:
    """The configuration each autotuned kernel picked, per autotune key, in this
    process: what the next tuning round prunes from."""
    import importlib

    from kernels import attention
    linear_gelu = importlib.import_module("kernels.linear_gelu")  # the module, not the function

    tuned = {"attention_fwd": attention._attn_fwd_tuned,
             "attention_bwd_dkdv": attention._attn_bwd_dkdv_tuned,
             "attention_bwd_dq": attention._attn_bwd_dq_tuned,
             "matmul": linear_gelu._matmul_kernel}
    choices = {}
    for name, tuner in tuned.items():
        cache = getattr(tuner, "cache", None)
        if cache:
            choices[name] = [{"key": [str(k) for k in key], "config": str(config)}
                             for key, config in cache.items()]
    return choices


def write_outputs(out_dir, env: dict, ceilings: Ceilings | None, results: list[Result],
                  args: dict, elapsed_s: float | None = None, plots: bool = True,
                  autotune: dict | None = None) -> dict[str, pathlib.Path]:
    """results.json, results.md and (with `plots`) the plots in out_dir; returns
    what was written. Each file is replaced atomically, so a reader (or a run
    killed mid-write) never sees half a table."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    payload = {"environment": env, "ceilings": ceilings.as_dict() if ceilings else None,
               "options": args, "elapsed_s": elapsed_s,
               "results": [r.as_dict() for r in results], "autotune": autotune or {}}
    written["json"] = out / "results.json"
    atomic_write_text(written["json"], json.dumps(payload, indent=2, default=str, allow_nan=True) + "\n")
    written["markdown"] = out / "results.md"
    atomic_write_text(written["markdown"], markdown(env, ceilings, results, args))
    if not plots:
        return written
    for name, plot in (("attention_tflops.png", plot_attention), ("training_tokens_per_s.png", plot_training)):
        try:
            if plot(results, out / name):
                written[name] = out / name
        except Exception as e:  # noqa: BLE001 - a plot must not lose the tables
            print(f"bench.report: could not draw {name}: {_first_line(e)}", file=sys.stderr)
    return written


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (default bench/results/<gpu>-<date>/)")
    p.add_argument("--quick", action="store_true",
                   help="GPT-2 shapes only and a short attention sweep (about 3 minutes)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds after which remaining comparisons are skipped (default {DEFAULT_BUDGET_S})")
    p.add_argument("--only", action="append", default=[],
                   help="run only sections whose name contains this (repeatable): layernorm, "
                        "linear_gelu, cross_entropy, adamw, attention, attention-sweep, training")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.report: no CUDA GPU on this machine (torch.cuda.is_available() is False); "
              "the report times GPU kernels, run it on a GPU machine", file=sys.stderr)
        return 2
    from bench.cases import gpu_plan

    start = time.monotonic()
    env = environment()
    out_dir = pathlib.Path(args.out) if args.out else default_out_dir(env)
    options = {"quick": args.quick, "budget_s": args.budget, "only": args.only}
    print(f"bench.report: {env['device']}, torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda_runtime']}, driver {env.get('driver')}", flush=True)
    try:
        ceilings = measure_ceilings("cuda")
        c = ceilings.as_dict()
        print(f"ceilings: copy {c['copy_GB_per_s']:.0f} GB/s, bf16 matmul "
              f"{c['bf16_matmul_TFLOP_per_s']:.0f} TFLOP/s", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"ceilings: not measured ({_first_line(e)})", flush=True)
        ceilings = None
    _free_memory()

    results: list[Result] = []
    interrupted = False
    for section, build in gpu_plan(args.quick):
        if args.only and not any(o in section for o in args.only):
            continue
        if interrupted or time.monotonic() - start > args.budget:
            why = "interrupted" if interrupted else f"time budget of {args.budget:.0f} s spent"
            results.append(Result(section, "-", "-", "-", check=f"skipped: {why}"))
            continue
        try:
            results.extend(run_case(section, build, ceilings, log=lambda s: print(s, flush=True)))
        except KeyboardInterrupt:  # Ctrl-C or a deadline's SIGINT: keep what was measured
            interrupted = True
            results.append(Result(section, "-", "-", "-", check="skipped: interrupted"))
            print("bench.report: interrupted; writing what was measured", flush=True)
        write_outputs(out_dir, env, ceilings, results, options, time.monotonic() - start,
                      plots=False, autotune=autotune_choices())

    elapsed = time.monotonic() - start
    written = write_outputs(out_dir, env, ceilings, results, options, elapsed,
                            autotune=autotune_choices())
    print()
    print(text_table(results))
    print(f"\nbench.report: {len(results)} rows in {elapsed:.0f} s; wrote "
          + ", ".join(str(p) for p in written.values()))
    if interrupted:
        return 130
    return 1 if any(r.check.startswith("FAIL") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
