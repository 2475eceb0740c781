"""What a bf16 training step of GPT-2 124M at B16 T1024 launches and moves outside
its matmuls, counted on any machine by bench.anatomy and printed at the end of the
run (and in --benchmark-json's extra_info), so the figure is tracked over time:
launches per layer, per micro-step and per step, activation-sized copies, weight
casts and gradient adds, and bytes outside matmuls; for the step as the trainer
runs it on a GPU (a bf16 residual stream, every fusion) and beside it the path
before (an fp32 stream, no fusions). The timed figure is only how long recording takes."""
import pytest

pytest.importorskip("triton", reason="the triton backend needs the triton package (Linux only)")

from bench import anatomy  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402

TRAINER_ACCUM = 32  # GPT-2's 0.5M-token batch of 16 x 1024 micro-batches on one GPU
VARIANTS = {"the trainer's GPU path": dict(residual_dtype="bf16", fusions="all"),
            "the path before (fp32 stream, no fusions)": dict(residual_dtype="fp32", fusions="none")}


@pytest.mark.benchmark(group="anatomy")
def test_gpt2_step_anatomy(benchmark, bench_registry):
    fig = benchmark.pedantic(anatomy.step_figures, kwargs=dict(device=DEVICE.type), rounds=1, iterations=1)
    benchmark.extra_info.update(
        launches_per_layer=fig.launches_per_layer,
        launches_per_micro_step=fig.launches_per_micro_step,
        launches_once_per_step=fig.step_launches_once,
        launches_per_step_accum1=fig.launches_per_step(1),
        activation_copies_per_micro_step=fig.activation_copies_per_micro_step,
        param_casts_per_micro_step=fig.param_casts_per_micro_step,
        grad_adds_per_micro_step=fig.grad_adds_per_micro_step,
        host_syncs_per_step=fig.host_syncs_per_step,
        GB_outside_matmuls_per_micro_step=fig.bytes_per_micro_step / 1e9,
        GB_outside_matmuls_once_per_step=fig.step_bytes_once / 1e9,
    )
    lines = []
    for title, variant in VARIANTS.items():
        f = fig if variant == VARIANTS["the trainer's GPU path"] else anatomy.step_figures(
            device=DEVICE.type, **variant)
        lines += [f"-- {title}", *anatomy.figures_lines(f, accums=(1, TRAINER_ACCUM))]
        shallow, deep = f.micro_steps
        lines += ["launches of one layer by kind:", *anatomy.table(deep, minus=shallow)]
    bench_registry.sections["training step anatomy (bench.anatomy; counts, not timings)"] = lines
    assert fig.launches_per_layer > 0 and fig.bytes_per_micro_step > 0
