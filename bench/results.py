"""What a measurement produced: a `Result` per variant, its throughput and share of
the measured ceiling, the session's `Registry` and its summary tables, and the
environment every result file records."""
from __future__ import annotations

import dataclasses
import datetime
import platform
import re
import subprocess
from dataclasses import dataclass, field

import torch

from bench.timing import Ceilings, Spread


@dataclass
class Result:
    group: str
    params: str
    variant: str
    subject: str                           # the variant the others are compared with ("ours")
    seconds: float | None = None           # median per call
    check: str = ""                        # "pass ...", "FAIL: ...", "error: ...", "skipped: ..."
    metrics: dict = field(default_factory=dict)
    # A peer's time / the subject's, median of paired rounds, and its interquartile
    # range: above 1 the subject is faster.
    subject_speedup: float | None = None
    subject_speedup_q1: float | None = None
    subject_speedup_q3: float | None = None
    subject_seconds: float | None = None   # the subject's median per call in those same rounds
    rounds: int = 0
    calls_per_round: int = 0
    meta: dict = field(default_factory=dict)  # the case's shape fields and facts (graphs on, ...)

    @property
    def ok(self) -> bool:
        return self.seconds is not None and self.check.startswith("pass")

    @property
    def is_subject(self) -> bool:
        return self.variant == self.subject

    def set_speedup(self, spread: Spread) -> None:
        self.subject_speedup, self.subject_speedup_q1, self.subject_speedup_q3 = (
            spread.median, spread.q1, spread.q3)

    def speedup_text(self) -> str:
        """The subject against this variant in words: "1.85x faster [1.80-1.90]" or
        "1.85x slower [...]" (median of the paired rounds, interquartile range)."""
        if self.is_subject:
            return "(subject)"
        if self.subject_speedup is None:
            return "-"
        ratio, q1, q3 = self.subject_speedup, self.subject_speedup_q1, self.subject_speedup_q3
        if ratio >= 1.0:
            return f"{Spread(ratio, q1, q3).text()} faster"
        return f"{Spread(1 / ratio, 1 / q3, 1 / q1).text()} slower"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def metrics_for(case, seconds: float, ceilings: Ceilings | None) -> dict:
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


def ceiling_pct(metrics: dict) -> float | None:
    return metrics.get("MFU_pct", metrics.get("pct_of_ceiling"))


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


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def best_peers(results: list[Result]) -> list[tuple[Result, Result | None, list[Result]]]:
    """Per comparison: (the subject's result, the fastest peer that passed its check or
    None, the peers that did not run). The fastest peer is the one with the lowest
    paired ratio to the subject, i.e. the one that came closest to it or beat it."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.group, r.params), []).append(r)
    out = []
    for rows in groups.values():
        subject = next((r for r in rows if r.is_subject), None)
        if subject is None:
            continue
        peers = [r for r in rows if not r.is_subject and r.ok and r.subject_speedup is not None]
        best = min(peers, key=lambda r: r.subject_speedup) if peers else None
        missing = [r for r in rows if not r.is_subject and not r.ok]
        out.append((subject, best, missing))
    return out


def peer_rows(results: list[Result]) -> list[tuple[str, ...]]:
    """op, shape, ours ms, best peer, its ms, ours vs it, % of ceiling (ours / peer), peers not run.
    Both times come from the same paired rounds as the ratio."""
    rows = []
    for subject, best, missing in best_peers(results):
        ours_ms = f"{subject.seconds * 1e3:.4g}" if subject.ok else subject.check[:40]
        pct = ceiling_pct(subject.metrics)
        pct_text = f"{pct:.1f}%" if pct is not None else "-"
        if best is not None:
            if best.subject_seconds is not None:  # ours as timed in the rounds paired with this peer
                ours_ms = f"{best.subject_seconds * 1e3:.4g}"
            peer_pct = ceiling_pct(best.metrics)
            pct_text += f" / {peer_pct:.1f}%" if peer_pct is not None else ""
            best_cells = (best.variant, f"{best.seconds * 1e3:.4g}", best.speedup_text())
        else:
            best_cells = ("-", "-", "-")
        not_run = "; ".join(f"{r.variant}: {r.check}" for r in missing)
        rows.append((subject.group, subject.params, ours_ms, *best_cells, pct_text, not_run))
    return rows


PEER_COLUMNS = ("op", "shape", "ours ms", "best peer", "peer ms", "ours vs peer",
                "% of ceiling (ours / peer)", "peers not run")


class Registry:
    """Results of one session, keyed (group, params, variant)."""

    def __init__(self):
        self.results: dict[tuple[str, str, str], Result] = {}
        self.sections: dict[str, list[str]] = {}  # titled text printed after the tables

    def add(self, result: Result) -> None:
        self.results[(result.group, result.params, result.variant)] = result

    def __bool__(self) -> bool:
        return bool(self.results or self.sections)

    def summary_lines(self) -> list[str]:
        # One time per variant (its own rounds); the ratio beside it comes from the
        # paired rounds, whose spread it carries.
        rows = [("group", "params", "variant", "ms/call", "subject vs this", "rounds", "throughput")]
        for r in sorted(self.results.values(),
                        key=lambda r: (r.group, r.params, not r.is_subject, r.variant)):
            ms = f"{r.seconds * 1e3:.4g}" if r.seconds is not None else "-"
            rounds = f"{r.rounds}x{r.calls_per_round}" if r.rounds else "-"
            rows.append((r.group, r.params, r.variant, ms, r.speedup_text(), rounds,
                         throughput_text(r.metrics)))
        return _table(rows)

    def peer_lines(self) -> list[str]:
        rows = peer_rows(list(self.results.values()))
        return _table([PEER_COLUMNS] + rows) if rows else []


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
