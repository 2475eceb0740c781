"""What one training step launches and moves, counted on any machine.

One bf16 micro-step of the real model structure (GPT-2's width 768, 12 heads, the
50257-token vocabulary; 2 and 3 layers; B=1, T=37) as the trainer runs it on a GPU
(GPT.forward_backward, a bf16 residual stream, every fusion, the optimizer's bf16
weight copies) is recorded by bench.anatomy (every aten op under a dispatch mode,
every Triton launch through a hook; shapes only, so the recording takes a fraction
of a second) and checked against the budgets below. T=37 is prime and divides no
model dimension, so nothing the size of a parameter is taken for an activation.

The budgets are what the kernel work reached, so a regression fails them: 22
launches per layer (61, then 55, before), no activation-sized copy in a block, no
cast of a weight or a gradient and no gradient handed to autograd to add, at most
9.5 GB outside matmuls per 12-layer micro-step at B16 T1024 (23.9 GB with the
fp32 stream and no fusions, counted the same way), 27 launches once per step, no
host sync. Before the lean-step work: 61 launches per layer, 72 activation-sized
copies per 12-layer micro-step, one launch per parameter to zero the gradients, a
host sync per step.
"""
import pytest
import torch

pytest.importorskip("triton", reason="the triton backend needs the triton package (Linux only)")

from bench import anatomy  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402

RECORD_T = 37
DEPTHS = (2, 3)
# Launches per transformer block, forward + backward, with the gradients already
# allocated (the trainer's steady state): forward 2 LayerNorms, 4 matmuls (qkv,
# attention's projection, the MLP's two) and the attention; backward 2 LayerNorms
# with their 2 weight-gradient reductions, 8 matmuls (each linear's dx and dW with
# db; the MLP's dh with the GELU derivative) and 3 attention kernels.
LAUNCHES_PER_LAYER_BUDGET = 22
# Bytes outside matmuls per micro-step of 12 layers at B16 T1024 (the recorder
# follows the GPU's path on any machine): 9.2 GB recorded.
BYTES_PER_MICRO_STEP_BUDGET = 9.5e9
# The path before (fp32 stream, no fusions) stays selectable beside it.
BEFORE = dict(residual_dtype="fp32", fusions="none")
# Launches a step makes once, beside its micro-steps: zeroing every gradient (one
# launch), clipping, the finiteness flag, the optimizer.
STEP_LAUNCHES_ONCE_BUDGET = 27

@pytest.fixture(scope="module")
def micro_steps() -> dict[int, anatomy.Anatomy]:
    return {L: anatomy.record_micro_step(anatomy.gpt2_width_config(L, residual_dtype="bf16"), 1, RECORD_T,
                                         device=DEVICE.type)
            for L in DEPTHS}


@pytest.fixture(scope="module")
def step_records() -> tuple[anatomy.Anatomy, anatomy.Anatomy, anatomy.Anatomy]:
    """Whole steps with one and two micro-steps, and the model's micro-step alone, of
    a narrow model with GPT-2's parameter tensors (fp32: what the step adds does not
    depend on the width or the dtype)."""
    cfg = anatomy.narrow_config(2)
    kwargs = dict(device=DEVICE.type, dtype="fp32")
    return (anatomy.record_train_step(cfg, 1, RECORD_T, accum=1, **kwargs),
            anatomy.record_train_step(cfg, 1, RECORD_T, accum=2, **kwargs),
            anatomy.record_micro_step(cfg, 1, RECORD_T, **kwargs))


def _listing(ops) -> str:
    return "\n".join(str(o) for o in ops)


# --------------------------------------------------------------------------
# The recorder
# --------------------------------------------------------------------------

def test_recorder_classifies_ops_and_counts_bytes():
    import triton
    import triton.language as tl

    @triton.jit
    def double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    x = torch.ones(5, 4, device=DEVICE)
    w = torch.ones(3, 4, device=DEVICE)
    for run_triton in (False, True):
        y = torch.zeros(20, device=DEVICE)
        with anatomy.Recorder(tokens=5, width=4, run_triton=run_triton) as rec:
            rec.phase = "forward"
            x.to(torch.float16)           # activation-sized cast
            w.to(torch.float16)           # parameter-sized cast
            x.view(20)                    # a view: no kernel
            x @ w.t()                     # a matmul (mm, after the free transpose)
            torch.stack([x, x])           # activation-sized stack
            double[(1,)](x, y, 20, BLOCK=32)
        ops = list(rec.ops)
        by_name = {o.name: o for o in ops}
        cast = [o for o in ops if o.name == "aten._to_copy.default"]
        assert [(o.category, o.activation_sized, o.bytes) for o in cast] == [
            ("copy", True, 5 * 4 * (4 + 2)), ("copy", False, 3 * 4 * (4 + 2))]
        assert by_name["aten.view.default"].launches == 0 and by_name["aten.view.default"].category == "free"
        assert by_name["aten.mm.default"].category == "matmul"
        assert by_name["aten.stack.default"].category == "stack"
        assert by_name["aten.stack.default"].activation_sized
        launch = by_name["triton:double"]
        assert (launch.category, launch.launches, launch.bytes, launch.dot) == ("triton", 1, 2 * 80, False)
        assert {o.phase for o in ops} == {"forward"}
        assert torch.equal(y.cpu(), torch.full((20,), 2.0) if run_triton else torch.zeros(20))
    assert anatomy.Anatomy(ops, 1, 5, 4).activation_copies() == [cast[0], by_name["aten.stack.default"]]


def test_recorder_sees_the_same_launches_whether_kernels_run_or_not():
    """Recording without running Triton, or with shapes only, changes no launch:
    the figures below are those of a real step."""
    cfg = anatomy.narrow_config(1)
    kwargs = dict(device=DEVICE.type, dtype="fp32")
    ran = anatomy.record_micro_step(cfg, 1, 7, fake=False, run_triton=True, **kwargs)
    skipped = anatomy.record_micro_step(cfg, 1, 7, fake=False, **kwargs)
    shapes_only = anatomy.record_micro_step(cfg, 1, 7, fake=True, **kwargs)

    def launches(a):
        return [(o.name, o.phase, o.bytes) for o in a.ops if o.launches]
    assert launches(ran) == launches(skipped) == launches(shapes_only)
    assert ran.counts("forward")["triton"] > 0 and ran.counts("backward")["triton"] > 0


def test_every_block_adds_the_same_launches(micro_steps):
    shallow, deep = (micro_steps[L] for L in DEPTHS)
    added = deep.names() - shallow.names()
    assert not (shallow.names() - deep.names()), "a deeper model launched fewer of some op"
    assert sum(added.values()) == deep.launches() - shallow.launches() > 0
    assert any(name.startswith("triton:") for name in added)


# --------------------------------------------------------------------------
# The budgets
# --------------------------------------------------------------------------

def test_no_block_copies_casts_stacks_or_clones_activations(micro_steps):
    """What each transformer block adds, forward and backward, on any device."""
    shallow, deep = (micro_steps[L] for L in DEPTHS)
    added = [o for o in deep.activation_copies()]
    assert len(added) == len(shallow.activation_copies()), (
        f"a block adds activation-sized copies:\n{_listing(added)}")


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_no_activation_sized_copy_or_cast(micro_steps, phase):
    found = [o for o in micro_steps[DEPTHS[-1]].activation_copies(phase) if o.category == "copy"]
    assert not found, f"{len(found)} activation-sized copies or casts:\n{_listing(found)}"


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_no_activation_sized_stack_cat_or_clone(micro_steps, phase):
    found = [o for o in micro_steps[DEPTHS[-1]].activation_copies(phase) if o.category == "stack"]
    assert not found, f"{len(found)} activation-sized stacks, cats or clones:\n{_listing(found)}"


def test_launches_per_layer_within_budget(micro_steps):
    shallow, deep = (micro_steps[L] for L in DEPTHS)
    per_layer = (deep.launches() - shallow.launches()) / (DEPTHS[1] - DEPTHS[0])
    assert per_layer <= LAUNCHES_PER_LAYER_BUDGET, (
        f"{per_layer:g} launches per layer > {LAUNCHES_PER_LAYER_BUDGET}: "
        f"{dict(deep.names() - shallow.names())}")


def test_no_weight_cast_and_no_gradient_handed_over_to_add(micro_steps):
    """Weights reach the matmuls as the optimizer's bf16 copies and every gradient
    is added into .grad by the kernel that computes it: no parameter-sized cast,
    forward or backward, and no gradient add, in the whole micro-step."""
    for depth, record in micro_steps.items():
        casts, adds = record.param_casts(), record.grad_adds()
        assert not casts, f"{len(casts)} weight or gradient casts at {depth} layers:\n{_listing(casts)}"
        assert not adds, f"{len(adds)} gradient adds at {depth} layers:\n{_listing(adds)}"


def test_bytes_outside_matmuls_within_budget():
    fig = anatomy.step_figures(device=DEVICE.type, direct=False)
    assert fig.bytes_per_micro_step <= BYTES_PER_MICRO_STEP_BUDGET, (
        f"{fig.bytes_per_micro_step / 1e9:.2f} GB outside matmuls per micro-step > {BYTES_PER_MICRO_STEP_BUDGET / 1e9:g} GB:\n"
        + "\n".join(anatomy.figures_lines(fig)))
    assert fig.param_casts_per_micro_step == 0 and fig.grad_adds_per_micro_step == 0


def test_the_path_before_stays_selectable():
    """fusions none with an fp32 stream is the step as it was: autocast's casts of
    weights and gradients, autograd's gradient adds, 55 launches per layer."""
    shallow, deep = (anatomy.record_micro_step(anatomy.gpt2_width_config(L, **BEFORE), 1, RECORD_T,
                                               device=DEVICE.type) for L in DEPTHS)
    assert deep.launches() - shallow.launches() == 55
    assert len(deep.param_casts()) - len(shallow.param_casts()) == 16
    assert len(deep.grad_adds()) - len(shallow.grad_adds()) == 12


def test_the_step_adds_no_pass_per_micro_step(step_records):
    """What a second micro-step adds to a step, beyond the model's forward and
    backward, is scalar bookkeeping (the loss's scaling and sum)."""
    one, two, model = step_records
    assert not (model.names() - (two.names() - one.names())), "a micro-step of the step lacks model ops"
    extra = (two.names() - one.names()) - model.names()
    assert not any(name.startswith("triton:") for name in extra), extra
    extra_bytes = (two.bytes_outside_matmuls() - one.bytes_outside_matmuls()
                   - model.bytes_outside_matmuls())
    assert extra_bytes < 1024, f"the step moves {extra_bytes} bytes per micro-step beyond the model"


def test_step_launches_once_within_budget(step_records):
    one, two, _ = step_records
    once = 2 * one.launches() - two.launches()
    assert once <= STEP_LAUNCHES_ONCE_BUDGET, (
        f"{once} launches once per step > {STEP_LAUNCHES_ONCE_BUDGET}: "
        f"{dict(one.names() - (two.names() - one.names()))}")


def test_the_step_never_waits_for_the_host(step_records):
    """A CUDA graph captures the step only if nothing in it reads a value back."""
    one, two, _ = step_records
    syncs = [o for o in one.ops + two.ops if o.category == "sync"]
    assert not syncs, f"{len(syncs)} host syncs:\n{_listing(syncs)}"
