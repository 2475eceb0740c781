"""Tests for gpt2_kernels/linear.py: linear == F.linear, with the bias and its
gradient inside the Triton matmuls, mixed-precision weights and gradient
accumulation into .grad.

On CPU the kernels run in Triton's interpreter (fp32 and fp16; small shapes);
bf16 and GPT-2 sizes are checked on a GPU.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux only)")
from gpt2_kernels import linear  # noqa: E402
from tests.helpers import (DEVICE, RTOL, assert_bf16_comparable, assert_close,  # noqa: E402
                           check_outputs, poisoned_allocations)

INTERP_DTYPES = [torch.float32, torch.float16]


def _make(lead, K, N, dtype, seed, bias=True, param_dtype=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(*lead, K, generator=g)
    w = torch.randn(N, K, generator=g) / max(K, 1) ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    dy = torch.randn(*lead, N, generator=g)
    p = param_dtype or dtype
    return (x.to(DEVICE, dtype), w.to(DEVICE, p), None if b is None else b.to(DEVICE, p),
            dy.to(DEVICE, dtype))


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _run(fn, x, w, b, dy, **kwargs):
    """(y, dx, dW, db) of fn on fresh leaves."""
    xl, wl, bl = _leaves(x, w, b)
    y = fn(xl, wl, bl, **kwargs)
    y.backward(dy)
    return y.detach(), xl.grad, wl.grad, None if bl is None else bl.grad


def _reference(x, w, b, dy, dtype):
    """F.linear with the weights in x's dtype (what the kernel computes), and in float64."""
    same = _run(lambda x, w, b: F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype)),
                x, w, b, dy)
    d = [None if t is None else t.double() for t in (x, w, b, dy)]
    return same, _run(F.linear, *d)


def _check(ours, x, w, b, dy, rtol):
    same, f64 = _reference(x, w, b, dy, x.dtype)
    check_outputs(("y", "dx", "dW", "db"), ours, same, f64, (x, x, w, b), rtol, peer="F.linear")


SHAPES = [  # (leading dims, K, N)
    ((1,), 1, 1),
    ((3,), 17, 33),
    ((33,), 257, 17),
    ((2, 37), 64, 96),   # crosses the interpreter's 32-wide tiles; many K steps in dW
    ((300,), 5, 7),      # dW's reduction runs over 300 rows
]


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_torch_and_float64(lead, K, N, dtype, bias):
    x, w, b, dy = _make(lead, K, N, dtype, seed=K * 100 + N, bias=bias)
    with poisoned_allocations():
        ours = _run(linear, x, w, b, dy)
    assert ours[0].shape == (*lead, N)
    _check(ours, x, w, b, dy, RTOL[dtype])


@pytest.mark.parametrize("with_copy", [False, True], ids=["cast", "compute_weight"])
def test_fp32_master_weights_with_fp16_activations(with_copy):
    """fp32 weight and bias with fp16 x: the matmuls run in fp16, the weight and
    bias gradients come in fp32 (never rounded to 16 bits); a caller's fp16 copy
    of the weight gives the same bits as the conversion made per call."""
    x, w, b, dy = _make((2, 19), 48, 40, torch.float16, seed=1, param_dtype=torch.float32)
    kwargs = dict(compute_weight=w.half()) if with_copy else {}
    with poisoned_allocations():
        ours = _run(linear, x, w, b, dy, **kwargs)
    assert (ours[2].dtype, ours[3].dtype) == (torch.float32, torch.float32)
    _check(ours, x, w, b, dy, RTOL[torch.float16])
    plain = _run(linear, x, w, b, dy)
    for name, a, c in zip(("y", "dx", "dW", "db"), ours, plain):
        assert torch.equal(a, c), f"{name}: compute_weight changed the result"


def test_the_matmuls_read_compute_weight():
    x, w, b, dy = _make((5,), 24, 16, torch.float32, seed=2)
    y = linear(x, w, b, compute_weight=2 * w)
    assert_close(y, F.linear(x.double(), 2 * w.double(), b.double()), RTOL[torch.float32])


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_accumulate_grad_adds_into_existing_grad(dtype):
    """With .grad allocated, the backward adds dW and db into it inside the matmul
    and hands autograd nothing (it would add them a second time); without .grad
    autograd delivers them as usual."""
    x, w, b, dy = _make((3, 11), 40, 24, dtype, seed=3, param_dtype=torch.float32)
    _, _, dw_ref, db_ref = _run(linear, x, w, b, dy)
    xl, wl, bl = _leaves(x, w, b)
    g = torch.Generator(device="cpu").manual_seed(4)
    wl.grad = torch.randn(w.shape, generator=g).to(DEVICE)
    bl.grad = torch.randn(b.shape, generator=g).to(DEVICE)
    w0, b0 = wl.grad.clone(), bl.grad.clone()
    grad_w, grad_b = wl.grad, bl.grad
    with poisoned_allocations():
        linear(xl, wl, bl, accumulate_grad=True).backward(dy)
    assert wl.grad is grad_w and bl.grad is grad_b, "the .grad tensors were replaced"
    assert_close(wl.grad, w0.double() + dw_ref.double(), 1e-6, "dW added into .grad")
    assert_close(bl.grad, b0.double() + db_ref.double(), 1e-6, "db added into .grad")

    xl, wl, bl = _leaves(x, w, b)
    bl.grad = torch.zeros_like(b)  # the weight has no .grad: autograd delivers dW
    linear(xl, wl, bl, accumulate_grad=True).backward(dy)
    assert torch.equal(wl.grad, dw_ref)
    assert torch.equal(bl.grad, db_ref)


@pytest.mark.parametrize("frozen", ["weight", "x", "bias", "weight+bias"])
def test_frozen_inputs_get_no_gradient(frozen):
    x, w, b, dy = _make((13,), 33, 21, torch.float32, seed=5)
    leaves = dict(zip(("x", "weight", "bias"), _leaves(x, w, b)))
    for name in frozen.split("+"):
        leaves[name].requires_grad_(False)
    with poisoned_allocations():
        linear(leaves["x"], leaves["weight"], leaves["bias"]).backward(dy)
    ref = dict(zip(("x", "weight", "bias"), _reference(x, w, b, dy, x.dtype)[1][1:]))
    for name, t in leaves.items():
        if name in frozen.split("+"):
            assert t.grad is None, f"{name} is frozen but got a gradient"
        else:
            assert_close(t.grad, ref[name], RTOL[torch.float32], name=f"d{name}")


@pytest.mark.parametrize("lead,K,N", [((0,), 16, 8), ((3,), 0, 8), ((3,), 16, 0)])
def test_empty(lead, K, N):
    x, w, b, dy = _make(lead, K, N, torch.float32, seed=6)
    with poisoned_allocations():
        ours = _run(linear, x, w, b, dy)
    _check(ours, x, w, b, dy, RTOL[torch.float32])


def test_deterministic_and_inference():
    x, w, b, dy = _make((2, 17), 65, 40, torch.float32, seed=7)
    first, second = _run(linear, x, w, b, dy), _run(linear, x, w, b, dy)
    for name, a, c in zip(("y", "dx", "dW", "db"), first, second):
        assert torch.equal(a, c), f"{name} differs between two identical runs"
    with torch.no_grad():
        assert torch.equal(linear(x, w.requires_grad_(), b), first[0])


@pytest.mark.parametrize("case,exc,pattern", [
    ("copy_dtype", TypeError, r"^linear: compute_weight has dtype float16; it must be x's dtype \(float32\)"),
    ("copy_shape", ValueError, r"^linear: compute_weight has shape \(6, 7\); expected \(6, 8\)$"),
    ("weight_k", ValueError, r"^linear: weight has shape \(6, 9\); expected \(\*, 8\) "),
    ("bias_shape", ValueError, r"^linear: bias has shape \(5,\); expected \(6,\) \(out_features,\)$"),
    ("int", TypeError, r"^linear: x has dtype int64; supported: float32, float16, bfloat16$"),
])
def test_bad_inputs(case, exc, pattern):
    x, w, b, _ = _make((4,), 8, 6, torch.float32, seed=0)
    kwargs = {}
    if case == "copy_dtype":
        kwargs["compute_weight"] = w.half()
    elif case == "copy_shape":
        kwargs["compute_weight"] = w[:, :7]
    elif case == "weight_k":
        w = torch.zeros(6, 9, device=DEVICE)
    elif case == "bias_shape":
        b = b[:5]
    elif case == "int":
        x = x.long()
    with pytest.raises(exc, match=pattern):
        linear(x, w, b, **kwargs)


# --- GPU: bf16 at GPT-2's shapes -----------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(768, 2304), (768, 768), (3072, 768)])
def test_gpu_bf16_gpt2_shapes(K, N):
    """bf16 activations with fp32 master weights, as the model runs: each output
    within 2x of PyTorch's own bf16 error (F.linear under autocast)."""
    x, w, b, dy = _make((16, 1024), K, N, torch.bfloat16, seed=20, param_dtype=torch.float32)
    ours = _run(linear, x, w, b, dy, compute_weight=w.to(torch.bfloat16))
    theirs = _run(lambda x, w, b: F.linear(x, w.to(x.dtype), b.to(x.dtype)), x, w, b, dy)
    d = [t.double() for t in (x, w, b, dy)]
    ref = _run(F.linear, *d)
    for name, o, t, r in zip(("y", "dx", "dW", "db"), ours, theirs, ref):
        assert_bf16_comparable(o, t, r, name=name)
