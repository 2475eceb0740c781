"""The one-call GPU report: every comparison, its check, its ceiling, in one run.

    python -m bench.report [--out DIR] [--quick] [--budget SECONDS] [--only SECTION]

Measures the ceilings first (device-to-device copy bandwidth, bf16 matmul rate at
8192^3), then runs each comparison of `bench.cases.gpu_plan` through the harness's
one loop (`bench.harness.measure_case`): every variant is checked against the
reference (recorded pass/FAIL; a failing variant is not timed), ours is timed, and
each peer is timed in paired rounds with ours, so that "ours vs peer" comes with
its spread. One comparison that fails (an OOM, a compile error) becomes an error
row; the rest continue. Comparisons left when the time budget is spent become
"skipped" rows. Each row of ours (and each triton variant of the training step)
carries bench.predict's predicted time, from the ceilings of this run, beside the
measured one.

Writes to bench/results/<gpu-name-slug>-<YYYY-MM-DD>/ (or --out): results.json
(with the configuration each autotuned kernel chose for each key), results.md (ours
beside the best peer of each comparison, then every row, with versions and
ceilings), attention_tflops.png and training_tokens_per_s.png.
The tables are rewritten after every comparison, so a run stopped from outside
keeps what it measured; an interrupt (Ctrl-C, SIGINT) skips the comparisons left and
writes the outputs. Exit status: 2 without CUDA, 130 when interrupted, 1 if any check
failed, else 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import torch

from bench.harness import first_line, free_memory, measure_case
from bench.results import (PEER_COLUMNS, Result, ceiling_pct, environment, peer_rows, slug,
                           throughput_text)
from bench.timing import Ceilings, measure_ceilings
from engine.fileio import atomic_write

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_BUDGET_S = 420  # the whole run stays under 8 minutes with the ceilings and plots


def default_out_dir(env: dict) -> pathlib.Path:
    day = datetime.date.today().isoformat()
    return ROOT / "results" / f"{slug(env.get('device', 'unknown'))}-{day}"


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

COLUMNS = ("op", "shape", "variant", "ms", "predicted ms", "ours ms (same rounds)", "ours vs this",
           "throughput", "% of ceiling", "check")


def _memory_text(m: dict) -> str:
    if "peak_mem_MB" not in m:
        return ""
    text = f", peak {m['peak_mem_MB']:,.0f} MB"
    if "peak_reserved_MB" in m:  # what a graphed step's private pool shows up in
        text += f" ({m['peak_reserved_MB']:,.0f} MB reserved)"
    return text


def _cells(r: Result) -> tuple[str, ...]:
    pct = ceiling_pct(r.metrics)
    predicted = r.metrics.get("predicted_ms")
    return (r.group, r.params, r.variant,
            f"{r.seconds * 1e3:.4g}" if r.seconds is not None else "-",
            f"{predicted:.4g}" if predicted is not None else "-",
            f"{r.subject_seconds * 1e3:.4g}" if r.subject_seconds is not None else "-",
            r.speedup_text() if r.seconds is not None else "-",
            throughput_text(r.metrics) + _memory_text(r.metrics),
            f"{pct:.1f}%" if pct is not None else "-",
            r.check)


def format_row(r: Result) -> str:
    return " | ".join(_cells(r))


def table_rows(results: list[Result]) -> list[tuple[str, ...]]:
    return [_cells(r) for r in results]


def _text(columns, rows) -> str:
    rows = [columns] + [tuple(c if len(c) <= 60 else c[:57] + "..." for c in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def text_table(results: list[Result]) -> str:
    return _text(COLUMNS, table_rows(results))


def peer_table(results: list[Result]) -> str:
    return _text(PEER_COLUMNS, peer_rows(results))


def _markdown_table(columns, rows) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return lines


def markdown(env: dict, ceilings: Ceilings | None, results: list[Result], args: dict) -> str:
    lines = [f"# Benchmark report: {env.get('device')} ({env.get('date')})", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    if ceilings is not None:
        c = ceilings.as_dict()
        lines.append(f"- ceilings measured in this run: copy {c['copy_GB_per_s']:.0f} GB/s "
                     f"(read + write), bf16 matmul {c['bf16_matmul_TFLOP_per_s']:.0f} TFLOP/s (8192^3)")
    lines.append(f"- options: {args}")
    lines += ["", "Times are per call: blocks of back-to-back calls ending in a device sync, "
              "median over rounds. \"ours vs peer\": how much faster (or slower) ours is, the "
              "median of the peer's time / ours over rounds in which both ran back to back, "
              "with the interquartile range in brackets. % of ceiling = throughput against the copy bandwidth (memory-bound ops) "
              "or the bf16 matmul rate (compute-bound ops; MFU for training, 6N + 6LCT FLOPs "
              "per token), both measured in this run. \"predicted ms\" is bench.predict's static "
              "model (calibrated on llm.c, with this run's ceilings): beside the measured time it "
              "tests the model.", ""]
    lines += ["## Ours beside the best peer", ""]
    lines += _markdown_table(PEER_COLUMNS, peer_rows(results))
    lines += ["", "## Every row", ""]
    lines += _markdown_table(COLUMNS, table_rows(results))
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
    process: what the next tuning round prunes from. Every `triton.autotune` object
    of the imported kernel modules is read, under its module-qualified name."""
    from triton.runtime.autotuner import Autotuner

    choices = {}
    for mod_name, module in sorted(sys.modules.items()):
        if module is None or not (mod_name == "gpt2_kernels" or mod_name.startswith("gpt2_kernels.")):
            continue
        for attr, tuner in sorted(vars(module).items()):
            cache = getattr(tuner, "cache", None) if isinstance(tuner, Autotuner) else None
            if cache:
                choices[f"{mod_name}.{attr}"] = [{"key": [str(k) for k in key], "config": str(config)}
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
            print(f"bench.report: could not draw {name}: {first_line(e)}", file=sys.stderr)
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
                        "linear_gelu, mlp, cross_entropy, adamw, attention, attention-dropout, attention-sweep, "
                        "training")
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
        print(f"ceilings: not measured ({first_line(e)})", flush=True)
        ceilings = None
    free_memory()
    predictor = None
    if ceilings is not None:
        try:
            from bench.predict import ReportPredictor, calibrated
            predictor = ReportPredictor(ceilings, calibrated(device="cuda"))
            print("predictions: " + "; ".join(predictor.assumptions.lines()), flush=True)
        except Exception as e:  # noqa: BLE001 - the measurements do not depend on the model
            print(f"predictions: none ({first_line(e)})", flush=True)

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
            results.extend(measure_case(build, ceilings, section, log=lambda s: print(s, flush=True),
                                        row=format_row, predict=predictor))
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
    print(peer_table(results))
    print()
    print(text_table(results))
    print(f"\nbench.report: {len(results)} rows in {elapsed:.0f} s; wrote "
          + ", ".join(str(p) for p in written.values()))
    if interrupted:
        return 130
    return 1 if any(r.check.startswith("FAIL") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
