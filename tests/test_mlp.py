"""Tests for gpt2_kernels/mlp.py: mlp == F.linear(F.gelu(F.linear(x, W1, b1),
approximate="tanh"), W2, b2), with the GELU derivative and the bias gradients
inside the matmuls.

On CPU the kernels run in Triton's interpreter (fp32 and fp16; small shapes);
bf16 and GPT-2 sizes are checked on a GPU.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux only)")
from gpt2_kernels import mlp  # noqa: E402
from tests.helpers import (DEVICE, RTOL, assert_bf16_comparable, assert_close,  # noqa: E402
                           check_outputs, poisoned_allocations)

INTERP_DTYPES = [torch.float32, torch.float16]
NAMES = ("y", "dx", "dW1", "db1", "dW2", "db2")


def _make(lead, C, H, N, dtype, seed, bias=True, param_dtype=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    p = param_dtype or dtype
    x = torch.randn(*lead, C, generator=g).to(DEVICE, dtype)
    # Pre-activations O(1), where GELU is curved.
    w1 = (torch.randn(H, C, generator=g) / C ** 0.5).to(DEVICE, p)
    b1 = torch.randn(H, generator=g).to(DEVICE, p) if bias else None
    w2 = (torch.randn(N, H, generator=g) / H ** 0.5).to(DEVICE, p)
    b2 = torch.randn(N, generator=g).to(DEVICE, p) if bias else None
    dy = torch.randn(*lead, N, generator=g).to(DEVICE, dtype)
    return (x, w1, b1, w2, b2), dy


def _torch_mlp(x, w1, b1, w2, b2):
    c = lambda t: None if t is None else t.to(x.dtype)  # noqa: E731
    return F.linear(F.gelu(F.linear(x, c(w1), c(b1)), approximate="tanh"), c(w2), c(b2))


def _run(fn, inputs, dy, **kwargs):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves, **kwargs)
    y.backward(dy)
    return (y.detach(), *(None if t is None else t.grad for t in leaves))


def _check(ours, inputs, dy, rtol):
    same = _run(_torch_mlp, inputs, dy)
    f64 = _run(_torch_mlp, [None if t is None else t.double() for t in inputs], dy.double())
    check_outputs(NAMES, ours, same, f64, (inputs[0], *inputs), rtol)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C,H,N", [((1,), 3, 5, 2), ((2, 19), 32, 96, 40), ((70,), 17, 33, 9)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_torch_and_float64(lead, C, H, N, dtype, bias):
    inputs, dy = _make(lead, C, H, N, dtype, seed=C + H + N, bias=bias)
    with poisoned_allocations():
        ours = _run(mlp, inputs, dy)
    assert ours[0].shape == (*lead, N)
    _check(ours, inputs, dy, RTOL[dtype])


def test_fp32_master_weights_copies_and_accumulation():
    """fp16 activations with fp32 parameters, as under autocast: the caller's fp16
    copies give the same bits as the per-call conversion, and accumulate_grad adds
    every parameter's gradient into its existing .grad (autograd adds nothing)."""
    inputs, dy = _make((3, 13), 24, 64, 24, torch.float16, seed=1, param_dtype=torch.float32)
    x, w1, b1, w2, b2 = inputs
    plain = _run(mlp, inputs, dy)
    _check(plain, inputs, dy, RTOL[torch.float16])
    copies = dict(fc_compute_weight=w1.half(), proj_compute_weight=w2.half())
    for name, a, c in zip(NAMES, plain, _run(mlp, inputs, dy, **copies)):
        assert torch.equal(a, c), f"{name}: the compute copies changed the result"

    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    g = torch.Generator(device="cpu").manual_seed(2)
    before = []
    for p in leaves[1:]:
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
        before.append((p.grad, p.grad.clone()))
    with poisoned_allocations():
        mlp(*leaves, accumulate_grad=True, **copies).backward(dy)
    for name, p, (grad, start), ref in zip(NAMES[2:], leaves[1:], before, plain[2:]):
        assert p.grad is grad, f"{name}: .grad was replaced"
        assert_close(p.grad, start.double() + ref.double(), 1e-6, name=f"{name} added into .grad")
    assert torch.equal(leaves[0].grad, plain[1])


@pytest.mark.parametrize("frozen", ["x", "fc", "proj", "fc+x"])
def test_frozen_inputs_get_no_gradient(frozen):
    inputs, dy = _make((9,), 16, 40, 16, torch.float32, seed=3)
    names = ("x", "fc", "fc", "proj", "proj")
    leaves = [t.detach().clone().requires_grad_(n not in frozen.split("+")) for t, n in zip(inputs, names)]
    with poisoned_allocations():
        mlp(*leaves).backward(dy)
    ref = _run(_torch_mlp, [t.double() for t in inputs], dy.double())[1:]
    for name, group, t, r in zip(NAMES[1:], names, leaves, ref):
        if group in frozen.split("+"):
            assert t.grad is None, f"{name} is frozen but got a gradient"
        else:
            assert_close(t.grad, r, RTOL[torch.float32], name=name)


def test_inference_and_determinism():
    inputs, dy = _make((2, 7), 24, 48, 24, torch.float32, seed=4)
    first, second = _run(mlp, inputs, dy), _run(mlp, inputs, dy)
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), f"{name} differs between two identical runs"
    with torch.no_grad():
        y = mlp(inputs[0], *(t.requires_grad_() for t in inputs[1:]))
    assert torch.equal(y, first[0])


@pytest.mark.parametrize("case,exc,pattern", [
    ("proj_h", ValueError, r"^mlp: proj_weight has shape \(8, 7\); expected \(\*, 12\) \(N, H\) with fc_weight's H$"),
    ("copy_dtype", TypeError, r"^mlp: fc_compute_weight has dtype float16; it must be x's dtype \(float32\)"),
    ("fc_bias", ValueError, r"^mlp: fc_bias has shape \(11,\); expected \(12,\) \(H,\)$"),
])
def test_bad_inputs(case, exc, pattern):
    (x, w1, b1, w2, b2), _ = _make((4,), 8, 12, 8, torch.float32, seed=0)
    kwargs = {}
    if case == "proj_h":
        w2 = w2[:, :7]
    elif case == "copy_dtype":
        kwargs["fc_compute_weight"] = w1.half()
    elif case == "fc_bias":
        b1 = b1[:11]
    with pytest.raises(exc, match=pattern):
        mlp(x, w1, b1, w2, b2, **kwargs)


@pytest.mark.gpu
def test_gpu_bf16_gpt2_size():
    """GPT-2 small's MLP at B16 T1024 in bf16 with fp32 master weights: every
    output within 2x of PyTorch's own bf16 error."""
    inputs, dy = _make((16, 1024), 768, 3072, 768, torch.bfloat16, seed=20, param_dtype=torch.float32)
    ours = _run(mlp, inputs, dy, fc_compute_weight=inputs[1].to(torch.bfloat16),
                proj_compute_weight=inputs[3].to(torch.bfloat16))
    theirs = _run(_torch_mlp, inputs, dy)
    ref = _run(_torch_mlp, [t.double() for t in inputs], dy.double())
    for name, o, t, r in zip(NAMES, ours, theirs, ref):
        assert_bf16_comparable(o, t, r, name=name)
