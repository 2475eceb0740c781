"""Tests for gpt2_kernels/linear_gelu.py: linear_gelu == F.gelu(F.linear(x, W, b), approximate="tanh").

On CPU the kernels run in Triton's interpreter, so shapes stay small; the
GPT-2-sized checks are marked `gpu`. The recompute and cuBLAS variants are not
part of the public function; they are reached through the module's `_Plan`.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux only)")
from gpt2_kernels.linear_gelu import _linear_gelu, _Plan, linear_gelu
from tests.helpers import (DEVICE, ON_GPU, RTOL, TEST_DTYPES, assert_bf16_comparable,
                           assert_close, poisoned_allocations)

# fp16 results sit a few output roundings from the float64 reference, so the
# float64 check uses the same per-dtype tolerance as the PyTorch one. bf16 runs
# on a GPU only (the interpreter's bf16 arithmetic is wrong).
INTERP_DTYPES = [torch.float32, torch.float16]


def _make(lead, K, N, dtype, seed, bias=True, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(*lead, K, generator=g)
    # nn.Linear-like scale keeps pre-activations O(1), where GELU is curved.
    w = torch.randn(N, K, generator=g) / max(K, 1) ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    dy = torch.randn(*lead, N, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x), cast(w), cast(b), cast(dy)


def _run(fn, x, w, b, dy, **kwargs):
    """Forward + backward; returns (y, dx, dW, db) with fresh leaf copies."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = fn(*leaves, **kwargs)
    y.backward(dy)
    return (y.detach(),) + tuple(None if t is None else t.grad for t in leaves)


# The module itself (`gpt2_kernels.linear_gelu` names the function once kernels is imported).
module = importlib.import_module("gpt2_kernels.linear_gelu")


def _ours(x, w, b, dy, plan=None):
    """The public function, or the module's computation under another `_Plan`."""
    with poisoned_allocations():
        if plan is None:
            return _run(linear_gelu, x, w, b, dy)
        return _run(lambda x, w, b: _linear_gelu(x, w, b, plan), x, w, b, dy)


def _torch_ref(x, w, b, dy):
    return _run(lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"), x, w, b, dy)


def _f64_ref(x, w, b, dy):
    d = lambda t: None if t is None else t.double()
    return _torch_ref(d(x), d(w), d(b), d(dy))


def _check_all(ours, x, w, b, dy, rtol):
    names = ("y", "dx", "dW", "db")
    for ref_name, ref in (("torch", _torch_ref(x, w, b, dy)), ("float64", _f64_ref(x, w, b, dy))):
        for name, o, r in zip(names, ours, ref):
            if r is None:
                assert o is None, f"{name} should be None"
                continue
            assert o.dtype == x.dtype, f"{name} has dtype {o.dtype}, expected {x.dtype}"
            assert_close(o, r, rtol, name=f"{name} vs {ref_name}")


SHAPES = [  # (leading dims, K, N)
    ((1,), 1, 1),
    ((3,), 17, 33),
    ((17,), 33, 3),
    ((33,), 3, 17),
    ((33,), 257, 17),
    ((17,), 33, 257),
    ((1,), 257, 1),
    ((2,), 64, 64),     # exact multiples of the interpreter's 32-wide tiles
    ((4,), 96, 384),    # GPT-2's 1:4 width ratio, shrunk
    ((3, 11), 33, 17),  # 3-D input
    ((300,), 5, 7),     # many row blocks: multi-step bias reduction and dW K-loop
]


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
def test_matches_torch_and_float64(lead, K, N, dtype):
    x, w, b, dy = _make(lead, K, N, dtype, seed=K * 1000 + N)
    ours = _ours(x, w, b, dy)
    assert ours[0].shape == (*lead, N)
    _check_all(ours, x, w, b, dy, RTOL[dtype])


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N", [((5,), 33, 17), ((2, 3), 40, 70)])
def test_without_bias(lead, K, N, dtype):
    x, w, b, dy = _make(lead, K, N, dtype, seed=7, bias=False)
    ours = _ours(x, w, None, dy)
    assert ours[3] is None
    _check_all(ours, x, w, None, dy, RTOL[dtype])


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_recompute(dtype, bias):
    x, w, b, dy = _make((2, 9), 47, 65, dtype, seed=11, bias=bias)
    _check_all(_ours(x, w, b, dy, _Plan(recompute=True)), x, w, b, dy, RTOL[dtype])


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("matmuls", [
    dict(forward="torch", dx="torch", dw="torch"),
    dict(forward="torch"),
    dict(dx="torch"),
    dict(dw="torch"),
], ids=["all-torch", "fwd-torch", "dx-torch", "dw-torch"])
def test_cublas_switches(matmuls, recompute):
    dtype = torch.float32
    x, w, b, dy = _make((19,), 37, 45, dtype, seed=3)
    _check_all(_ours(x, w, b, dy, _Plan(recompute=recompute, **matmuls)),
               x, w, b, dy, RTOL[dtype])


def test_plan_validation():
    with pytest.raises(ValueError, match="^_Plan: dx is 'cublas'; expected 'triton' or 'torch'$"):
        _Plan(dx="cublas")


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_non_contiguous_inputs_and_grad(dtype):
    """Transposed views of x, W and dy are read through their strides."""
    x, w, b, dy = _make((2, 21), 35, 19, dtype, seed=5)
    x_t = x.transpose(-1, -2).contiguous().transpose(-1, -2)   # last dim stride != 1
    w_t = w.t().contiguous().t()
    dy_t = dy.transpose(0, 1).contiguous().transpose(0, 1)
    assert x_t.stride(-1) != 1 and w_t.stride(-1) != 1 and not dy_t.is_contiguous()
    b_s = torch.stack([b, b], dim=1)[:, 0]                     # stride 2
    ours = _ours(x_t, w_t, b_s, dy_t)
    _check_all(ours, x, w, b, dy, RTOL[dtype])


def test_broadcast_grad_from_sum():
    """y.sum() hands backward an expanded gradient with all strides 0."""
    x, w, b, _ = _make((3, 5), 33, 17, torch.float32, seed=6)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with poisoned_allocations():
        linear_gelu(*leaves).sum().backward()
    ref = _f64_ref(x, w, b, torch.ones(3, 5, 17, dtype=torch.float64, device=DEVICE))
    for name, t, r in zip(("dx", "dW", "db"), leaves, ref[1:]):
        assert_close(t.grad, r, RTOL[torch.float32], name=name)


def test_one_dimensional_input():
    x, w, b, dy = _make((), 33, 17, torch.float32, seed=8)
    assert x.dim() == 1
    ours = _ours(x, w, b, dy)
    assert ours[0].shape == (17,)
    _check_all(ours, x, w, b, dy, RTOL[torch.float32])


@pytest.mark.parametrize("lead,K,N", [((0,), 16, 8), ((2, 0), 16, 8), ((3,), 0, 8), ((3,), 16, 0)])
def test_empty(lead, K, N):
    x, w, b, dy = _make(lead, K, N, torch.float32, seed=9)
    ours = _ours(x, w, b, dy)
    assert ours[0].shape == (*lead, N)
    _check_all(ours, x, w, b, dy, RTOL[torch.float32])


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_deterministic(dtype):
    x, w, b, dy = _make((2, 17), 129, 65, dtype, seed=10)
    first = _ours(x, w, b, dy)
    second = _ours(x, w, b, dy)
    for name, a, c in zip(("y", "dx", "dW", "db"), first, second):
        assert torch.equal(a, c), f"{name} differs between two identical runs"


@pytest.mark.parametrize("recompute", [False, True])
def test_inputs_untouched(recompute):
    x, w, b, dy = _make((3, 7), 33, 40, torch.float32, seed=12)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    g = dy.clone()
    with poisoned_allocations():
        _linear_gelu(*leaves, _Plan(recompute=recompute)).backward(g)
    for name, before, after in zip(("x", "weight", "bias", "dy"), (x, w, b, dy), (*leaves, g)):
        assert torch.equal(before, after.detach()), f"{name} was modified"


def _count_matmuls(monkeypatch):
    calls = []
    original = module._matmul

    def spy(a, b, *args, **kwargs):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(module, "_matmul", spy)
    return calls


@pytest.mark.parametrize("frozen", ["weight", "x", "bias", "weight+bias"])
def test_needs_input_grad(frozen, monkeypatch):
    """Frozen inputs get no gradient, their matmul is skipped, and the other
    gradients stay correct."""
    M, K, N = 13, 33, 21
    x, w, b, dy = _make((M,), K, N, torch.float32, seed=13)
    leaves = {"x": x.clone(), "weight": w.clone(), "bias": b.clone()}
    for name, t in leaves.items():
        t.requires_grad_(name not in frozen.split("+"))
    calls = _count_matmuls(monkeypatch)
    with poisoned_allocations():
        linear_gelu(leaves["x"], leaves["weight"], leaves["bias"]).backward(dy)
    ref = dict(zip(("x", "weight", "bias"), _f64_ref(x, w, b, dy)[1:]))
    for name, t in leaves.items():
        if name in frozen.split("+"):
            assert t.grad is None, f"{name} is frozen but got a gradient"
        else:
            assert_close(t.grad, ref[name], RTOL[torch.float32], name=f"d{name}")
    dw_calls = [c for c in calls if c == ((N, M), (M, K))]
    dx_calls = [c for c in calls if c == ((M, N), (N, K))]
    assert len(dw_calls) == (0 if "weight" in frozen else 1)
    assert len(dx_calls) == (0 if frozen == "x" else 1)


def test_inference_stores_no_preactivation(monkeypatch):
    seen = []
    original = module._forward
    monkeypatch.setattr(module, "_forward", lambda *a, **k: seen.append(k["store_pre"]) or original(*a, **k))
    x, w, b, _ = _make((5,), 16, 24, torch.float32, seed=14)
    with torch.no_grad():
        y = linear_gelu(x, w.requires_grad_(), b)
    assert seen == [False]
    assert_close(y, F.gelu(F.linear(x.double(), w.double(), b.double()), approximate="tanh"),
                 RTOL[torch.float32])


@pytest.mark.skipif(ON_GPU, reason="checks the interpreter's bf16 upcast path")
def test_bf16_interpreter_upcast():
    """The interpreter's bf16 arithmetic is wrong; the kernels upcast there, so
    results must be within bf16 rounding of float64, not garbage."""
    x, w, b, dy = _make((9,), 40, 24, torch.bfloat16, seed=15)
    ours = _ours(x, w, b, dy)
    for name, o, r in zip(("y", "dx", "dW", "db"), ours, _f64_ref(x, w, b, dy)):
        assert o.dtype == torch.bfloat16
        assert_close(o, r, 3e-2, name=name)


@pytest.mark.parametrize("loss", ["linear", "quadratic"])
@pytest.mark.parametrize("recompute", [False, True])
def test_double_backward_is_refused(recompute, loss):
    """The backward is not differentiable: asking for a graph of the gradients
    raises instead of giving a silently wrong second derivative, also when the
    loss is linear in y (the gradient-penalty pattern, which torch's
    once_differentiable lets through)."""
    x, w, b, dy = _make((3,), 8, 6, torch.float32, seed=16)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()

    def objective():
        y = _linear_gelu(xs, ws, b, _Plan(recompute=recompute))
        return (y * dy).sum() if loss == "linear" else (y * y).sum()

    for inputs in ([xs], [ws], [xs, ws]):
        with pytest.raises(RuntimeError, match="^linear_gelu: cannot differentiate twice"):
            torch.autograd.grad(objective(), inputs, create_graph=True)
    assert torch.autograd.grad(objective(), [xs])[0].abs().sum() > 0


def test_strided_and_expanded_bias_and_strided_operands():
    """A bias that is a column of a wider tensor (stride 2) or one value expanded
    (stride 0), a transposed weight and a column-sliced x: the values and the
    gradients (mapped back to the storage they came from) against float64."""
    x, w, b, dy = _make((5,), 12, 7, torch.float32, seed=17)
    wide_b = torch.stack([b, torch.full_like(b, 9.0)], dim=1)  # b is column 0
    one = torch.tensor([0.4], device=DEVICE)
    wide_x = torch.cat([x, torch.full_like(x, 9.0)], dim=1)  # x is the first 12 columns
    w_t = w.t().contiguous()  # weight is w_t.t(): a transposed view
    rtol = RTOL[torch.float32]
    for kind, (b_src, as_b) in {"column": (wide_b, lambda t: t[:, 0]),
                                "expanded": (one, lambda t: t.expand(7))}.items():
        x_leaf, wt_leaf, b_leaf = (t.clone().requires_grad_() for t in (wide_x, w_t, b_src))
        with poisoned_allocations():
            y = linear_gelu(x_leaf[:, :12], wt_leaf.t(), as_b(b_leaf))
            y.backward(dy)
        y6, dx6, dw6, db6 = _f64_ref(x, w, as_b(b_src), dy)
        assert_close(y, y6, rtol, f"{kind}: y")
        expect_dx = torch.zeros_like(wide_x, dtype=torch.float64)
        expect_dx[:, :12] = dx6
        assert_close(x_leaf.grad, expect_dx, rtol, f"{kind}: dx")
        assert_close(wt_leaf.grad, dw6.t(), rtol, f"{kind}: dW")
        expect_db = torch.zeros_like(b_src, dtype=torch.float64)
        if kind == "column":
            expect_db[:, 0] = db6
        else:
            expect_db[0] = db6.sum()
        assert_close(b_leaf.grad, expect_db, rtol, f"{kind}: db")


# --- argument checks --------------------------------------------------------

def _good():
    return _make((4,), 8, 6, torch.float32, seed=0)[:3]


@pytest.mark.parametrize("case,exc,pattern", [
    ("meta", ValueError, r"linear_gelu: x is on meta"),
    ("mixed_device", ValueError, r"linear_gelu: weight is on meta but x is on"),
    ("mixed_dtype", TypeError, r"^linear_gelu: weight has dtype float16 but x has float32; they must match$"),
    ("int", TypeError, r"^linear_gelu: x has dtype int64; supported: float32, float16, bfloat16$"),
    ("float64", TypeError, r"^linear_gelu: x has dtype float64; supported"),
    ("scalar", ValueError, r"^linear_gelu: x has shape \(\); expected at least 1 dimension \(\.\.\., in_features\)$"),
    ("weight_1d", ValueError, r"^linear_gelu: weight has shape \(8,\); expected 2-d \(out_features, in_features\)$"),
    ("weight_k", ValueError, r"^linear_gelu: weight has shape \(6, 9\); expected \(\*, 8\) "
                             r"\(out_features, in_features\) with x's in_features$"),
    ("bias_shape", ValueError, r"^linear_gelu: bias has shape \(5,\); expected \(6,\) \(out_features,\)$"),
    ("not_tensor", TypeError, r"^linear_gelu: weight must be a torch.Tensor, got list$"),
])
def test_bad_inputs(case, exc, pattern):
    x, w, b = _good()
    if case == "meta":
        x, w, b = (t.to("meta") for t in (x, w, b))
    elif case == "mixed_device":
        w = w.to("meta")
    elif case == "mixed_dtype":
        w = w.half()
    elif case == "int":
        x, w, b = (t.long() for t in (x, w, b))
    elif case == "float64":
        x, w, b = (t.double() for t in (x, w, b))
    elif case == "scalar":
        x = x[0, 0]
    elif case == "weight_1d":
        w = w[0]
    elif case == "weight_k":
        w = torch.zeros(6, 9, device=x.device)
    elif case == "bias_shape":
        b = b[:5]
    elif case == "not_tensor":
        w = w.tolist()
    with pytest.raises(exc, match=pattern):
        linear_gelu(x, w, b)


def test_cpu_tensor_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b = (t.cpu() for t in _good())
    with pytest.raises(ValueError, match=r"linear_gelu: x is on cpu; a CUDA tensor is needed"):
        linear_gelu(x, w, b)


# --- GPU: real shapes, bf16, TF32 ---------------------------------------------

GPT2_MLP = (16384, 768, 3072)  # (B*T, C, 4C) for GPT-2 small at B=16, T=1024


@pytest.mark.gpu
def test_gpu_bf16_gpt2_size():
    M, K, N = GPT2_MLP
    x, w, b, dy = _make((M,), K, N, torch.bfloat16, seed=20)
    ours = _ours(x, w, b, dy)
    theirs = _torch_ref(x, w, b, dy)
    ref = _f64_ref(x, w, b, dy)
    for name, o, t, r in zip(("y", "dx", "dW", "db"), ours, theirs, ref):
        assert_bf16_comparable(o, t, r, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("recompute", [False, True])
def test_gpu_gpt2_size(dtype, recompute):
    M, K, N = GPT2_MLP
    x, w, b, dy = _make((M // 1024, 1024), K, N, dtype, seed=21)
    _check_all(_ours(x, w, b, dy, _Plan(recompute=recompute)), x, w, b, dy, RTOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("lead,K,N", [((1000,), 771, 3001), ((3, 333), 257, 129)])
def test_gpu_odd_sizes_all_dtypes(lead, K, N):
    for dtype in TEST_DTYPES:
        x, w, b, dy = _make(lead, K, N, dtype, seed=22)
        ours = _ours(x, w, b, dy)
        if dtype == torch.bfloat16:
            for name, o, t, r in zip(("y", "dx", "dW", "db"), ours, _torch_ref(x, w, b, dy),
                                     _f64_ref(x, w, b, dy)):
                assert_bf16_comparable(o, t, r, name=name)
        else:
            _check_all(ours, x, w, b, dy, RTOL[dtype])


@pytest.mark.gpu
def test_gpu_tf32_follows_torch_setting():
    """With PyTorch's TF32 switch on, fp32 runs on TF32 tensor cores: close to
    float64 at TF32 accuracy (10-bit mantissa), not at fp32 accuracy."""
    M, K, N = 4096, 768, 3072
    x, w, b, dy = _make((M,), K, N, torch.float32, seed=23)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        ours = _ours(x, w, b, dy)
        torch.backends.cuda.matmul.allow_tf32 = False
        ieee = _ours(x, w, b, dy)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    ref = _f64_ref(x, w, b, dy)
    for name, o, e, r in zip(("y", "dx", "dW", "db"), ours, ieee, ref):
        assert_close(o, r, 5e-3, name=f"{name} (tf32)")
        assert_close(e, r, RTOL[torch.float32], name=f"{name} (ieee)")


@pytest.mark.gpu
def test_gpu_deterministic_large():
    x, w, b, dy = _make((4096,), 768, 3072, torch.bfloat16, seed=24)
    first = _ours(x, w, b, dy)
    for _ in range(3):
        again = _ours(x, w, b, dy)
        for name, a, c in zip(("y", "dx", "dW", "db"), first, again):
            assert torch.equal(a, c), f"{name} differs between identical runs"
