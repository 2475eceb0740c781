"""A static model of the training step's time on a Hopper GPU, from what the step
does (counted on any machine by bench.anatomy), calibrated on llm.c.

    python -m bench.predict [--batch-size 16] [--seq-len 1024]

The model: every kernel takes the longer of its arithmetic at a fraction of the
bf16 matmul rate and its memory traffic at a fraction of the copy bandwidth, plus
a fixed gap per launch (ramp-up and drain between kernels):

- the matmuls (6 FLOPs per parameter per token, llm.c's count) at
  `matmul_efficiency` of the matmul rate;
- attention (6 * L * C * T FLOPs per token, causal) at `attention_ratio` times that;
- the bytes moved outside matmuls (bench.anatomy's count of the step: kernels that
  read a tensor twice, or touch only some rows, counted as they do) at
  `copy_efficiency` of the copy bandwidth; matmuls are taken to hide their own
  operand traffic;
- once per step the optimizer and the gradients' zeroing and clipping (the
  anatomy's count, with the AdamW kernel's table-addressed parameters and
  gradients added, which the recorder cannot see), and with several GPUs the
  gradients' reduce-scatter and the weights' all-gather at the interconnect's rate.

The rates are the ceilings measured on GPU machines (the bf16 matmul rate at
8192^3 on random data and the device-to-device copy bandwidth, bytes read +
written); `bench.report` uses those it measures in its own run instead.

Calibration: `matmul_efficiency` is the one number fitted. llm.c trains GPT-2 124M
at B=64, T=1024 on 8 H100s (ZeRO-1: each GPU updates an eighth of the weights)
at 468K tokens/s per GPU; its step is modelled as this engine's step with every
fusion and a bf16 residual stream (llm.c keeps the stream and the weights in bf16
and takes the GELU backward and the bias gradients from cuBLASLt's epilogues), at
llm.c's shapes. The other assumptions are stated, not fitted, and printed. The GPU
report (bench/report.py) prints each prediction beside what it measures, so the
first run on a GPU tests the model as well as the code.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from bench.work import gpt_flops_per_token

# The AdamW kernel reads each parameter, its gradient and both moments and writes
# the parameter and the moments (28 bytes per fp32 parameter) through a table of
# addresses; the recorder sees only the moment buffers and the bf16 copies.
ADAMW_UNRECORDED_BYTES_PER_PARAM = 20
LLMC_TOKENS_PER_S_PER_H100 = 468_000
LLMC = dict(batch_size=64, seq_len=1024, world=8)


@dataclass(frozen=True)
class Ceiling:
    """What a GPU does at best: bf16 matmul FLOP/s and copy bytes/s (read + written)."""
    name: str
    matmul_flops_per_s: float
    copy_bytes_per_s: float


# Measured on this project's GPU machines (see the module docstring).
GPUS = {"H100": Ceiling("H100", 798e12, 3.0e12), "H200": Ceiling("H200", 780e12, 4.3e12)}


@dataclass(frozen=True)
class Assumptions:
    matmul_efficiency: float = 0.55        # matmuls' share of the matmul rate (the calibrated one)
    attention_ratio: float = 0.6           # attention's efficiency relative to the matmuls' (head dim 64)
    copy_efficiency: float = 0.85          # memory-bound kernels' share of the copy bandwidth
    launch_gap_s: float = 2e-6             # per kernel: ramp-up and drain
    interconnect_bytes_per_s: float = 350e9  # NVLink, per GPU, as collectives use it

    def lines(self) -> list[str]:
        return [f"matmul efficiency {self.matmul_efficiency:.3f} of the bf16 matmul rate (calibrated)",
                f"attention efficiency {self.attention_ratio:g} x the matmuls' = "
                f"{self.attention_ratio * self.matmul_efficiency:.3f} of the matmul rate",
                f"copy efficiency {self.copy_efficiency:g} of the copy bandwidth (memory-bound kernels)",
                f"{self.launch_gap_s * 1e6:g} us per kernel launch (ramp-up and drain)",
                f"interconnect {self.interconnect_bytes_per_s / 1e9:g} GB/s per GPU (several GPUs only)",
                "every 16-bit dot on wgmma and no register spill inside a kernel's main loop: what "
                "`python -m bench.compile_check` demands of every sm_90 build (it fails otherwise); "
                "the model does not read that check's per-kernel figures"]


@dataclass(frozen=True)
class StepWork:
    """What one optimizer step does on one GPU."""
    tokens: int
    matmul_flops: float
    attention_flops: float
    bytes: float             # outside matmuls, micro-steps and the once-per-step part
    launches: float
    comm_bytes: float = 0.0  # sent and received by the collectives, with several GPUs

    def seconds(self, gpu: Ceiling, a: Assumptions) -> dict[str, float]:
        """The step's predicted time by part."""
        peak = gpu.matmul_flops_per_s * a.matmul_efficiency
        return {"matmuls": self.matmul_flops / peak,
                "attention": self.attention_flops / (peak * a.attention_ratio),
                "memory-bound kernels": self.bytes / (gpu.copy_bytes_per_s * a.copy_efficiency),
                "launch gaps": self.launches * a.launch_gap_s,
                "collectives": self.comm_bytes / a.interconnect_bytes_per_s}

    def tokens_per_s(self, gpu: Ceiling, a: Assumptions) -> float:
        return self.tokens / sum(self.seconds(gpu, a).values())


def step_work(fig, *, n_params: int, n_layer: int, width: int, seq_len: int, accum: int,
              world: int = 1) -> StepWork:
    """The work of a step from bench.anatomy.StepFigures (`fig`): `accum`
    micro-steps and the once-per-step part; with `world` GPUs the optimizer
    updates 1/world of the weights (ZeRO-1) and the collectives move bf16
    gradients and weights."""
    tokens = fig.tokens * accum
    per_token = gpt_flops_per_token(n_params, n_layer, width, seq_len)
    attention = 6.0 * n_layer * width * seq_len
    micro_bytes = fig.bytes_per_micro_step
    once = fig.step_bytes_once + ADAMW_UNRECORDED_BYTES_PER_PARAM * n_params
    comm = 2 * 2 * n_params * (world - 1) / world if world > 1 else 0.0
    return StepWork(tokens=tokens, matmul_flops=(per_token - attention) * tokens,
                    attention_flops=attention * tokens, bytes=micro_bytes * accum + once / world,
                    launches=fig.launches_per_step(accum), comm_bytes=comm)


def figures(batch_size: int, seq_len: int, *, residual_dtype: str = "bf16", fusions: str = "all",
            device: str = "cpu"):
    from bench import anatomy
    return anatomy.step_figures(batch_size=batch_size, seq_len=seq_len, direct=False, device=device,
                                residual_dtype=residual_dtype, fusions=fusions)


def gpt2_work(batch_size: int, seq_len: int, *, total_batch: int = 524288, world: int = 1,
              residual_dtype: str = "bf16", fusions: str = "all", device: str = "cpu") -> StepWork:
    """GPT-2 124M's step at micro-batch batch_size x seq_len, `total_batch` tokens
    per step over `world` GPUs."""
    fig = figures(batch_size, seq_len, residual_dtype=residual_dtype, fusions=fusions, device=device)
    accum = max(1, total_batch // (batch_size * seq_len * world))
    return step_work(fig, n_params=fig.n_params, n_layer=fig.n_layer, width=768, seq_len=seq_len,
                     accum=accum, world=world)


def calibrate(llmc: StepWork, gpu: Ceiling = GPUS["H100"], target: float = LLMC_TOKENS_PER_S_PER_H100,
              base: Assumptions = Assumptions()) -> Assumptions:
    """`base` with the matmul efficiency that makes llm.c's step run at `target`
    tokens/s (bisection: the rate grows with the efficiency)."""
    lo, hi = 0.05, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if llmc.tokens_per_s(gpu, dataclasses.replace(base, matmul_efficiency=mid)) < target:
            lo = mid
        else:
            hi = mid
    fitted = dataclasses.replace(base, matmul_efficiency=(lo + hi) / 2)
    if not 0.06 < fitted.matmul_efficiency < 0.99:
        raise ValueError(f"calibration: no matmul efficiency in (0.05, 1) gives {target:,.0f} tokens/s; "
                         "the other assumptions leave too little or too much time")
    return fitted


def op_seconds(flops: float, bytes_moved: float, gpu: Ceiling, a: Assumptions, *,
               attention: bool = False, launches: int = 1) -> float:
    """One op's predicted time: the longer of its arithmetic and its traffic, plus its launches."""
    rate = gpu.matmul_flops_per_s * a.matmul_efficiency * (a.attention_ratio if attention else 1.0)
    return max(flops / rate, bytes_moved / (gpu.copy_bytes_per_s * a.copy_efficiency)) + launches * a.launch_gap_s


def calibrated(device: str = "cpu") -> Assumptions:
    return calibrate(gpt2_work(**{k: LLMC[k] for k in ("batch_size", "seq_len")}, world=LLMC["world"],
                               device=device))


class ReportPredictor:
    """The predictions bench.report prints beside what it measures, with the
    ceilings measured in the same run: for each op our kernel's time from its
    FLOPs and least bytes, for the training step each triton variant's from its
    anatomy at the case's shapes (GPT-2 124M, no dropout)."""

    def __init__(self, ceilings, assumptions: Assumptions, device: str = "cuda"):
        self.gpu = Ceiling("this GPU", ceilings.matmul_flops_per_s, ceilings.copy_bytes_per_s)
        self.assumptions = assumptions
        self.device = device
        self._steps: dict[tuple, float] = {}

    def __call__(self, case, variant: str) -> float | None:
        from bench.cases import TRAIN_TRITON_VARIANTS
        if case.group == "train-step":
            meta = case.meta
            if variant not in TRAIN_TRITON_VARIANTS or meta.get("preset") != "gpt2" or meta.get("dropout"):
                return None
            B, T = meta["batch_size"], meta["seq_len"]
            key = (B, T, variant)
            if key not in self._steps:
                work = gpt2_work(B, T, total_batch=B * T, device=self.device, **TRAIN_TRITON_VARIANTS[variant])
                self._steps[key] = work.tokens / work.tokens_per_s(self.gpu, self.assumptions)
            return self._steps[key]
        if variant != case.subject or not (case.flops or case.bytes):
            return None
        return op_seconds(case.flops, case.bytes, self.gpu, self.assumptions,
                          attention=case.group.startswith("attention"))


def report_lines(batch_size: int = 16, seq_len: int = 1024, device: str = "cpu") -> list[str]:
    from bench import cases
    from bench.work import (adamw_bytes, attention_bytes, attention_flops, cross_entropy_work,
                            layernorm_bytes, linear_gelu_work, mlp_work)
    a = calibrated(device)
    lines = ["assumptions:", *(f"  {line}" for line in a.lines()),
             f"  ceilings: " + "; ".join(f"{g.name} bf16 matmul {g.matmul_flops_per_s / 1e12:.0f} TFLOP/s, "
                                         f"copy {g.copy_bytes_per_s / 1e12:.1f} TB/s" for g in GPUS.values()),
             f"calibration: llm.c's GPT-2 124M step (B={LLMC['batch_size']}, T={LLMC['seq_len']}, "
             f"{LLMC['world']} GPUs, ZeRO-1) modelled as this engine's with every fusion: "
             f"{LLMC_TOKENS_PER_S_PER_H100:,} tokens/s per H100", ""]
    variants = {"every fusion, bf16 stream (the default)": dict(residual_dtype="bf16", fusions="all"),
                "the path before (no fusions, fp32 stream)": dict(residual_dtype="fp32", fusions="none")}
    for title, variant in variants.items():
        work = gpt2_work(batch_size, seq_len, device=device, **variant)
        lines.append(f"GPT-2 124M step, one GPU, B={batch_size} T={seq_len}, 524,288 tokens per step, {title}:")
        for gpu in GPUS.values():
            parts = work.seconds(gpu, a)
            total = sum(parts.values())
            lines.append(f"  {gpu.name}: {work.tokens / total:,.0f} tokens/s, {total * 1e3:.1f} ms per step "
                         f"(" + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in parts.items()) + ")")
    M, K, N = cases.MLP_SHAPE["M"], cases.MLP_SHAPE["K"], cases.MLP_SHAPE["N"]
    att = cases.ATTN_MAIN
    ce = cases.CE_SHAPE
    ops = [
        ("layernorm-fwdbwd rows=16384 C=768", 0.0, layernorm_bytes(cases.ROWS, 768, 2, False, True), False),
        ("add_layernorm-fwdbwd rows=16384 C=768", 0.0, layernorm_bytes(cases.ROWS, 768, 2, True, True), False),
        ("linear_gelu-fwdbwd", *linear_gelu_work(M, K, N, 2, True), False),
        ("mlp-fwdbwd", *mlp_work(M, K, N, K, 2, True), False),
        ("linear_cross_entropy-fwdbwd", *cross_entropy_work(ce["N"], ce["C"], ce["V"], 2, True), False),
        ("adamw-step gpt2", 0.0, adamw_bytes(124_475_904), False),
    ]
    for kind in ("fwd", "bwd", "fwdbwd"):
        ops.append((f"attention-{kind} B16 H12 T1024 D64", attention_flops(**att, causal=True, kind=kind),
                    attention_bytes(**att, elem=2, kind=kind), True))
    lines += ["", "per op, bf16 at GPT-2 shapes (predicted ms):"]
    lines += [f"  {name}: " + ", ".join(f"{g.name} {op_seconds(f, b, g, a, attention=att_) * 1e3:.3f}"
                                        for g in GPUS.values())
              for name, f, b, att_ in ops]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    args = p.parse_args(argv)
    import os

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # The step is recorded, not run; on a CPU the kernels' launchers accept CPU
        # tensors only with Triton's interpreter on (read when they are imported).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print("\n".join(report_lines(args.batch_size, args.seq_len, device=device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
