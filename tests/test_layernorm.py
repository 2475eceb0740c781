"""gpt2_kernels/layernorm.py: layer_norm and add_layer_norm against PyTorch and float64.

On CPU the kernels run in Triton's interpreter (slow), so row counts stay small;
the real GPT-2 shapes and bf16 run in the GPU-marked tests.
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux only)")
from gpt2_kernels.layernorm import _dropout_mask, add_layer_norm, layer_norm
from tests.helpers import (AtenRecorder, DEVICE, RTOL, assert_bf16_comparable, assert_close,
                           poisoned_allocations)

EXACT_DTYPES = [torch.float32, torch.float16]

WIDTHS = [1, 3, 17, 257, 768, 1000, 3072]
# (leading shape, C): every width with every row count of {1, 3, 17}, plus 3-D
# leading shapes.
LN_SHAPES = [((rows,), C) for C in WIDTHS for rows in (1, 3, 17)] + [
    ((2, 3), 257), ((3, 1), 1000)]
# The fused op: every width once, row counts varying, and a 3-D leading shape.
ADD_SHAPES = [((17,), 1), ((3,), 3), ((1,), 17), ((17,), 257), ((3,), 768),
              ((1,), 1000), ((3,), 3072), ((2, 3), 768)]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _make(lead, C, dtype, seed, has_bias=True, residual=False):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, C)
    # Offset mean and non-unit spread so centring and scaling are both exercised.
    x = (torch.randn(shape, generator=g) * 2.0 + 0.7).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    w = (1.0 + 0.5 * torch.randn(C, generator=g)).to(dtype)
    b = (0.5 * torch.randn(C, generator=g)).to(dtype) if has_bias else None
    dy = torch.randn(shape, generator=g).to(dtype)
    dh = torch.randn(shape, generator=g).to(dtype)
    move = (lambda t: t.to(DEVICE) if t is not None else None)
    return tuple(move(t) for t in (x, r, w, b, dy, dh))


def _grads(outs, grad_outs, inputs):
    """Gradients of sum(out * g) w.r.t. inputs (None for inputs given as None)."""
    live = [t for t in inputs if t is not None]
    got = torch.autograd.grad(outs, live, grad_outs)
    it = iter(got)
    return [next(it) if t is not None else None for t in inputs]


def _ln_ref64(x, w, b, dy, eps=1e-5):
    """LayerNorm and its gradients written out in float64: (y, dx, dweight, dbias).
    Where the normalised row is exactly constant (C == 1) this gives exact zeros
    for dx and dweight, where autograd through F.layer_norm leaves rounding noise."""
    x, w, dy = x.double(), w.double(), dy.double()
    C = x.shape[-1]
    mean = x.mean(-1, keepdim=True)
    xc = x - mean
    rstd = 1.0 / torch.sqrt((xc * xc).mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    y = xhat * w + (b.double() if b is not None else 0.0)
    wdy = w * dy
    dx = rstd * (wdy - wdy.mean(-1, keepdim=True) - xhat * (xhat * wdy).mean(-1, keepdim=True))
    dw = (dy * xhat).reshape(-1, C).sum(0)
    db = dy.reshape(-1, C).sum(0) if b is not None else None
    return y, dx, dw, db


def _check(name, ours, torch_out, ref64, rtol, skip_torch=False):
    if not skip_torch:
        assert_close(ours, torch_out, rtol, f"{name} vs PyTorch")
    assert_close(ours, ref64, rtol, f"{name} vs float64")


# ----------------------------------------------------------------------------- layer_norm


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", LN_SHAPES, ids=lambda v: str(v))
def test_layer_norm_forward_backward(lead, C, dtype):
    x, _, w, b, dy, _ = _make(lead, C, dtype, seed=C * 31 + len(lead))
    rtol = RTOL[dtype]

    xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
    with poisoned_allocations():
        y = layer_norm(xs, ws, bs)
        dx, dw, db = _grads([y], [dy], [xs, ws, bs])

    xt, wt, bt = _leaf(x), _leaf(w), _leaf(b)
    yt = F.layer_norm(xt, (C,), wt, bt, 1e-5)
    dxt, dwt, dbt = _grads([yt], [dy], [xt, wt, bt])

    y6, dx6, dw6, db6 = _ln_ref64(x, w, b, dy)

    assert y.shape == x.shape and y.dtype == dtype
    # With C == 1 the normalised row is exactly 0, so y == bias and dx ==
    # dweight == 0 exactly; PyTorch returns rounding noise around these (relative
    # error O(1) where bias is small), so there only the exact _ln_ref64 judges.
    _check("y", y, yt, y6, rtol, skip_torch=C == 1)
    _check("dx", dx, dxt, dx6, rtol, skip_torch=C == 1)
    _check("dweight", dw, dwt, dw6, rtol, skip_torch=C == 1)
    _check("dbias", db, dbt, db6, rtol)


@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
def test_layer_norm_without_bias(dtype):
    x, _, w, _, dy, _ = _make((3,), 257, dtype, seed=5, has_bias=False)
    xs, ws = _leaf(x), _leaf(w)
    with poisoned_allocations():
        y = layer_norm(xs, ws, None)
        dx, dw = _grads([y], [dy], [xs, ws])
    xt, wt = _leaf(x), _leaf(w)
    yt = F.layer_norm(xt, (257,), wt, None, 1e-5)
    dxt, dwt = _grads([yt], [dy], [xt, wt])
    rtol = RTOL[dtype]
    assert_close(y, yt, rtol, "y")
    assert_close(dx, dxt, rtol, "dx")
    assert_close(dw, dwt, rtol, "dweight")


def test_layer_norm_eps_is_used():
    # A nearly constant row makes the result depend strongly on eps.
    x, _, w, b, _, _ = _make((3,), 17, torch.float32, seed=6)
    x = x * 1e-3
    with poisoned_allocations():
        y = layer_norm(x, w, b, eps=1e-2)
    assert_close(y, F.layer_norm(x, (17,), w, b, 1e-2), RTOL[torch.float32], "y")


def test_layer_norm_strided_inputs():
    """A row-strided slice (handled without a copy), a transposed x (copied),
    and upstream grads with a zero row stride or no unit column stride."""
    C = 17
    g = torch.Generator().manual_seed(7)
    base = torch.randn(5, C + 6, generator=g).to(DEVICE)
    w = torch.randn(C, generator=g).to(DEVICE)
    b = torch.randn(C, generator=g).to(DEVICE)
    v = torch.randn(C, generator=g).to(DEVICE)
    rtol = RTOL[torch.float32]
    inputs = {
        "row-strided": base[:, 2:2 + C],
        "transposed": torch.randn(C, 4, generator=g).to(DEVICE).t(),
    }
    for kind, x in inputs.items():
        xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
        xt, wt, bt = _leaf(x), _leaf(w), _leaf(b)
        with poisoned_allocations():
            y = layer_norm(xs, ws, bs)
            # dy = v broadcast over rows: row stride 0.
            (y * v).sum().backward()
        (F.layer_norm(xt, (C,), wt, bt, 1e-5) * v).sum().backward()
        assert_close(y, F.layer_norm(x, (C,), w, b, 1e-5), rtol, f"{kind}: y")
        assert_close(xs.grad, xt.grad, rtol, f"{kind}: dx")
        assert_close(ws.grad, wt.grad, rtol, f"{kind}: dweight")
        assert_close(bs.grad, bt.grad, rtol, f"{kind}: dbias")
    # dy with no unit column stride.
    x = inputs["row-strided"]
    dy_t = torch.randn(C, x.shape[0], generator=g).to(DEVICE).t()
    xs, xt = _leaf(x), _leaf(x)
    with poisoned_allocations():
        (dx,) = torch.autograd.grad(layer_norm(xs, w, b), [xs], dy_t)
    (dxt,) = torch.autograd.grad(F.layer_norm(xt, (C,), w, b, 1e-5), [xt], dy_t)
    assert_close(dx, dxt, rtol, "dx with transposed dy")


def test_layer_norm_only_requested_grads():
    x, _, w, b, dy, _ = _make((3,), 17, torch.float32, seed=8)
    rtol = RTOL[torch.float32]
    ref_x, ref_w, ref_b = _leaf(x), _leaf(w), _leaf(b)
    _grads_ref = _grads([F.layer_norm(ref_x, (17,), ref_w, ref_b, 1e-5)], [dy],
                        [ref_x, ref_w, ref_b])
    # Only x.
    xs = _leaf(x)
    with poisoned_allocations():
        layer_norm(xs, w, b).backward(dy)
    assert_close(xs.grad, _grads_ref[0], rtol, "dx")
    # Only weight and bias (the x grad is not computed: x needs none).
    ws, bs = _leaf(w), _leaf(b)
    with poisoned_allocations():
        layer_norm(x, ws, bs).backward(dy)
    assert_close(ws.grad, _grads_ref[1], rtol, "dweight")
    assert_close(bs.grad, _grads_ref[2], rtol, "dbias")
    # Only bias.
    bs = _leaf(b)
    ws = w.clone()
    with poisoned_allocations():
        layer_norm(x, ws, bs).backward(dy)
    assert ws.grad is None
    assert_close(bs.grad, _grads_ref[2], rtol, "dbias alone")


def test_layer_norm_no_grad_mode():
    x, _, w, b, _, _ = _make((3,), 17, torch.float32, seed=9)
    with torch.no_grad(), poisoned_allocations():
        y = layer_norm(_leaf(x), _leaf(w), _leaf(b))
    assert not y.requires_grad
    assert_close(y, F.layer_norm(x, (17,), w, b, 1e-5), RTOL[torch.float32], "y")


# ----------------------------------------------------------------------------- add_layer_norm


def _add_ln_reference(x, r, w, b, dy, dh, C, use_dh):
    """PyTorch's (x + r, LN(x + r)) and the grads of (x, r, w, b), in the inputs' dtype."""
    xs, rs, ws, bs = (_leaf(t) if t is not None else None for t in (x, r, w, b))
    h = xs + rs
    y = F.layer_norm(h, (C,), ws, bs, 1e-5)
    outs, gouts = ([h, y], [dh, dy]) if use_dh else ([y], [dy])
    return (h, y, *_grads(outs, gouts, [xs, rs, ws, bs]))


def _add_ln_ref64(x, r, w, b, dy, dh, use_dh):
    """The same in float64, with h rounded to the inputs' dtype first, as the op
    (and PyTorch) rounds it: (y, dx, dresidual, dweight, dbias)."""
    h = (x.double() + r.double()).to(x.dtype)
    y, dx, dw, db = _ln_ref64(h, w, b, dy)
    if use_dh:
        dx = dx + dh.double()
    return y, dx, dx, dw, db


@pytest.mark.parametrize("use_dh", [False, True], ids=["dy-only", "dy+dh"])
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", ADD_SHAPES, ids=lambda v: str(v))
def test_add_layer_norm_forward_backward(lead, C, dtype, use_dh):
    x, r, w, b, dy, dh = _make(lead, C, dtype, seed=C * 7 + 1, residual=True)
    rtol = RTOL[dtype]
    xs, rs, ws, bs = _leaf(x), _leaf(r), _leaf(w), _leaf(b)
    with poisoned_allocations():
        h, y = add_layer_norm(xs, rs, ws, bs)
        outs, gouts = ([h, y], [dh, dy]) if use_dh else ([y], [dy])
        dx, dr, dw, db = _grads(outs, gouts, [xs, rs, ws, bs])
    ht, yt, dxt, drt, dwt, dbt = _add_ln_reference(x, r, w, b, dy, dh, C, use_dh)
    y6, dx6, dr6, dw6, db6 = _add_ln_ref64(x, r, w, b, dy, dh, use_dh)

    assert h.shape == y.shape == x.shape and h.dtype == y.dtype == dtype
    # h is one rounded add: it must equal PyTorch's bit for bit.
    assert torch.equal(h, ht), "h differs from x + residual"
    c1 = C == 1  # see test_layer_norm_forward_backward
    _check("y", y, yt, y6, rtol, skip_torch=c1)
    _check("dx", dx, dxt, dx6, rtol, skip_torch=c1)
    _check("dresidual", dr, drt, dr6, rtol, skip_torch=c1)
    _check("dweight", dw, dwt, dw6, rtol, skip_torch=c1)
    _check("dbias", db, dbt, db6, rtol)


def test_add_layer_norm_without_bias_and_unused_outputs():
    C = 257
    x, r, w, _, dy, dh = _make((3,), C, torch.float32, seed=11, has_bias=False, residual=True)
    rtol = RTOL[torch.float32]
    # Only h used: d(x) = d(residual) = dh, no weight grad.
    xs, rs, ws = _leaf(x), _leaf(r), _leaf(w)
    with poisoned_allocations():
        h, _ = add_layer_norm(xs, rs, ws, None)
        h.backward(dh)
    assert torch.equal(xs.grad, dh) and torch.equal(rs.grad, dh)
    assert ws.grad is None
    # Only y used, bias None.
    xs, rs, ws = _leaf(x), _leaf(r), _leaf(w)
    with poisoned_allocations():
        _, y = add_layer_norm(xs, rs, ws, None)
        dx, dr, dw = _grads([y], [dy], [xs, rs, ws])
    _, yt, dxt, drt, dwt, _ = _add_ln_reference(x, r, w, None, dy, dh, C, use_dh=False)
    assert_close(y, yt, rtol, "y")
    assert_close(dx, dxt, rtol, "dx")
    assert_close(dr, drt, rtol, "dresidual")
    assert_close(dw, dwt, rtol, "dweight")
    # Only the residual needs a grad.
    rs = _leaf(r)
    with poisoned_allocations():
        _, y = add_layer_norm(x, rs, w, None)
        (dr2,) = torch.autograd.grad(y, [rs], dy)
    assert_close(dr2, drt, rtol, "dresidual alone")


# ----------------------------------------------------------------------------- mixed dtypes

# (x, residual, weight and bias, out_dtype): the branch in a 16-bit dtype on an
# fp32 residual stream with fp32 master weights (autocast's case, fp16 standing
# in for bf16 on CPU), and the other mixes the contract allows.
MIXED = [
    (torch.float16, torch.float32, torch.float32, torch.float16),
    (torch.float16, torch.float32, torch.float32, None),
    (torch.float32, torch.float16, torch.float16, None),
    (torch.float16, torch.float16, torch.float32, torch.float32),
    # A bf16 residual stream (GPTConfig.residual_dtype): valid under the
    # interpreter, which loads, stores and converts bf16 exactly (no bf16 arithmetic).
    (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32, None),
]
_TOL_BY_DTYPE = {torch.float32: 2e-5, torch.float16: RTOL[torch.float16], torch.bfloat16: 8e-3}


def _mixed_case(lead, C, x_dtype, r_dtype, w_dtype, out_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, C)
    x = (torch.randn(shape, generator=g) * 0.5).to(x_dtype)
    r = (torch.randn(shape, generator=g) * 2.0 + 0.3).to(r_dtype)
    w = (1.0 + 0.3 * torch.randn(C, generator=g)).to(w_dtype)
    b = (0.3 * torch.randn(C, generator=g)).to(w_dtype)
    dh = torch.randn(shape, generator=g).to(r_dtype)
    dy = torch.randn(shape, generator=g).to(out_dtype or r_dtype)
    return tuple(t.to(DEVICE) for t in (x, r, w, b, dh, dy))


def _mixed_reference(x, r, w, b, dh, dy, out_dtype):
    """The contract in fp32: h = (r + x) rounded to r's dtype, y = LayerNorm(h)
    rounded to out_dtype; gradients in fp32 (rounded by the caller's tolerance)."""
    xs, rs, ws, bs = (t.detach().float().requires_grad_() for t in (x, r, w, b))
    # h rounded to residual's dtype, its gradient left unrounded (the kernel
    # keeps it in fp32 until each gradient is stored in its input's dtype).
    h = rs + xs
    h = h + (h.to(r.dtype).float() - h).detach()
    y = F.layer_norm(h, (x.shape[-1],), ws, bs, 1e-5)
    grads = torch.autograd.grad([h, y], [xs, rs, ws, bs], [dh.float(), dy.float()])
    return h.to(r.dtype), y.to(out_dtype or r.dtype), grads


def _check_mixed(x, r, w, b, dh, dy, out_dtype):
    leaves = [_leaf(t) for t in (x, r, w, b)]
    with poisoned_allocations():
        h, y = add_layer_norm(*leaves, out_dtype=out_dtype)
        grads = torch.autograd.grad([h, y], leaves, [dh, dy])
    h_ref, y_ref, grads_ref = _mixed_reference(x, r, w, b, dh, dy, out_dtype)
    assert h.dtype == r.dtype and y.dtype == (out_dtype or r.dtype)
    assert torch.equal(h, h_ref), "h is not (residual + x) rounded once to residual's dtype"
    assert_close(y, y_ref.float(), _TOL_BY_DTYPE[y.dtype], "y")
    for name, leaf, grad, ref in zip(("dx", "dresidual", "dweight", "dbias"), leaves, grads, grads_ref):
        assert grad.dtype == leaf.dtype, f"{name} is {grad.dtype}, its input {leaf.dtype}"
        assert_close(grad, ref, _TOL_BY_DTYPE[grad.dtype], name)


@pytest.mark.parametrize("x_dtype,r_dtype,w_dtype,out_dtype", MIXED, ids=str)
@pytest.mark.parametrize("lead,C", [((3,), 17), ((2, 2), 768)], ids=str)
def test_add_layer_norm_takes_each_dtype_as_it_is(lead, C, x_dtype, r_dtype, w_dtype, out_dtype):
    _check_mixed(*_mixed_case(lead, C, x_dtype, r_dtype, w_dtype, out_dtype, seed=C), out_dtype)


@pytest.mark.parametrize("x_dtype,w_dtype,out_dtype", [
    (torch.float16, torch.float32, None), (torch.float32, torch.float16, torch.float16)], ids=str)
def test_layer_norm_takes_fp32_weights_with_a_16_bit_x(x_dtype, w_dtype, out_dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 33, generator=g) * 2 + 1).to(x_dtype).to(DEVICE)
    w = (1 + 0.3 * torch.randn(33, generator=g)).to(w_dtype).to(DEVICE)
    b = (0.3 * torch.randn(33, generator=g)).to(w_dtype).to(DEVICE)
    dy = torch.randn(5, 33, generator=g).to(out_dtype or x_dtype).to(DEVICE)
    leaves = [_leaf(t) for t in (x, w, b)]
    with poisoned_allocations():
        y = layer_norm(*leaves, out_dtype=out_dtype)
        grads = torch.autograd.grad(y, leaves, dy)
    refs = [t.detach().float().requires_grad_() for t in (x, w, b)]
    y_ref = F.layer_norm(refs[0], (33,), refs[1], refs[2], 1e-5)
    grads_ref = torch.autograd.grad(y_ref, refs, dy.float())
    assert y.dtype == (out_dtype or x_dtype)
    assert_close(y, y_ref, _TOL_BY_DTYPE[y.dtype], "y")
    for name, leaf, grad, ref in zip(("dx", "dweight", "dbias"), leaves, grads, grads_ref):
        assert grad.dtype == leaf.dtype, name
        assert_close(grad, ref, _TOL_BY_DTYPE[grad.dtype], name)


@pytest.mark.gpu
@pytest.mark.parametrize("lead,C", [((16, 1024), 768), ((17,), 1000)], ids=str)
def test_gpu_bf16_branch_on_an_fp32_stream(lead, C):
    """Autocast's case on the GPU: a bf16 branch, fp32 residual and weights, bf16 y."""
    bf16, fp32 = torch.bfloat16, torch.float32
    _check_mixed(*_mixed_case(lead, C, bf16, fp32, fp32, bf16, seed=C), bf16)


_NO_PASS_OPS = {"empty", "empty_like", "empty_strided", "view", "_reshape_alias", "detach"}


def test_no_cast_or_copy_outside_the_kernels():
    """The residual stream's dtypes cost no pass: a 16-bit branch, an fp32 stream
    and fp32 weights go through forward and backward with nothing but
    allocations and views outside the kernels."""
    x, r, w, b, dh, dy = _mixed_case((4,), 48, torch.float16, torch.float32, torch.float32,
                                     torch.float16, seed=1)
    leaves = [_leaf(t) for t in (x, r, w, b)]
    leaves2 = [_leaf(t) for t in (r, w, b)]
    with AtenRecorder() as rec:
        h, y = add_layer_norm(*leaves, out_dtype=torch.float16)
        torch.autograd.backward([h, y], [dh, dy])
        y2 = layer_norm(*leaves2, out_dtype=torch.float16)
        y2.backward(dy)
    assert rec.ops, "the recorder saw nothing"
    assert set(rec.names) <= _NO_PASS_OPS, f"passes outside the kernels: {set(rec.names) - _NO_PASS_OPS}"
    assert [t.grad.dtype for t in leaves] == [torch.float16, torch.float32, torch.float32, torch.float32]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("loss", ["linear", "quadratic"])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_double_backward_is_refused(op, loss):
    """The backward kernels are not differentiable: asking for a graph of the
    gradients raises instead of giving a silently wrong second derivative --
    also when the loss is linear in the output (a gradient penalty on y.sum()),
    where torch's once_differentiable lets it through -- while the first-order
    gradients are unaffected."""
    x, r, w, b, dy, _ = _make((3,), 17, torch.float32, seed=2, residual=True)
    leaves = [_leaf(t) for t in (x, r, w, b)]
    xs, rs, ws, bs = leaves

    def objective():
        if op == "layer_norm":
            y = layer_norm(xs, ws, bs)
            return (y * dy).sum() if loss == "linear" else (y * y).sum()
        h, y = add_layer_norm(xs, rs, ws, bs)
        return (y * dy + h).sum() if loss == "linear" else (y * y).sum() + (h * h).sum()

    wrt = [xs, ws, bs] if op == "layer_norm" else leaves
    for inputs in (wrt, [xs]):
        with pytest.raises(RuntimeError, match=f"^{op}: cannot differentiate twice"):
            torch.autograd.grad(objective(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match=f"^{op}: cannot differentiate twice"):
        objective().backward(create_graph=True)
    (dx,) = torch.autograd.grad(objective(), [xs])
    assert torch.isfinite(dx).all() and dx.abs().sum() > 0


def test_strided_and_expanded_weight_and_bias():
    """A weight or bias that is a column of a wider tensor (stride 2) or one value
    expanded (stride 0) is read as the tensor it is -- forward and gradients
    against float64, the gradients mapped back to the storage they came from."""
    C = 17
    x, r, w, b, dy, dh = _make((3,), C, torch.float32, seed=40, residual=True)
    wide_w = torch.stack([w, torch.full_like(w, 9.0)], dim=1)  # w is column 0
    wide_b = torch.stack([b, torch.full_like(b, 9.0)], dim=1)
    one = torch.tensor([1.3], device=DEVICE)
    rtol = RTOL[torch.float32]
    for kind, (w_src, b_src, as_w, as_b) in {
        "column": (wide_w, wide_b, lambda t: t[:, 0], lambda t: t[:, 0]),
        "expanded": (one, b, lambda t: t.expand(C), lambda t: t),
    }.items():
        w_leaf, b_leaf = _leaf(w_src), _leaf(b_src)
        w_used, b_used = as_w(w_leaf), as_b(b_leaf)
        assert not w_used.is_contiguous()
        w64 = as_w(w_src).detach()
        for op in ("layer_norm", "add_layer_norm"):
            xs, rs = _leaf(x), _leaf(r)
            with poisoned_allocations():
                if op == "layer_norm":
                    y = layer_norm(xs, w_used, b_used)
                    h_in = x
                    torch.autograd.backward([y], [dy])
                else:
                    h, y = add_layer_norm(xs, rs, w_used, b_used)
                    h_in = x + r
                    torch.autograd.backward([h, y], [dh, dy])
            y6, dx6, dw6, db6 = _ln_ref64(h_in, w64, as_b(b_src).detach(), dy)
            assert_close(y, y6, rtol, f"{kind} {op}: y")
            assert_close(xs.grad, dx6 + (0 if op == "layer_norm" else dh.double()), rtol, f"{kind} {op}: dx")
            expect_dw = torch.zeros_like(w_src, dtype=torch.float64)
            expect_db = torch.zeros_like(b_src, dtype=torch.float64)
            if kind == "column":
                expect_dw[:, 0], expect_db[:, 0] = dw6, db6
            else:
                expect_dw[0], expect_db = dw6.sum(), db6
            assert_close(w_leaf.grad, expect_dw, rtol, f"{kind} {op}: dweight")
            assert_close(b_leaf.grad, expect_db, rtol, f"{kind} {op}: dbias")
            w_leaf.grad = b_leaf.grad = None


# ----------------------------------------------------------------------------- dropout


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def _dropout_reference(x, r, w, b, dh, dy, keep, p):
    """The contract with an explicit mask, in fp32: h = r + x * keep / (1 - p)
    (rounded to h's dtype, its gradient not), y = LayerNorm(h); the gradients."""
    xs, ws, bs = (t.detach().float().requires_grad_() for t in (x, w, b))
    rs = r.detach().float().requires_grad_() if r is not None else None
    h = xs * keep * (1.0 / (1.0 - p))
    if rs is not None:
        h = rs + h
    h_dtype = r.dtype if r is not None else x.dtype
    h = h + (h.to(h_dtype).float() - h).detach()
    y = F.layer_norm(h, (x.shape[-1],), ws, bs, 1e-5)
    leaves = [t for t in (xs, rs, ws, bs) if t is not None]
    grads = torch.autograd.grad([h, y], leaves, [dh.float(), dy.float()])
    return h.to(h_dtype), y, grads


# (x dtype, residual dtype or None for the first block)
DROPOUT_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float32, None),
                  (torch.float16, None)]


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("x_dtype,r_dtype", DROPOUT_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", [((3,), 17), ((2, 3), 257)], ids=str)
def test_dropout_forward_and_gradients_for_the_mask_drawn(lead, C, x_dtype, r_dtype, p):
    """Against PyTorch with the mask the kernels drew, materialised by the same
    Philox stream: h, y and every gradient, with and without a residual."""
    g = torch.Generator().manual_seed(C)
    shape = (*lead, C)
    x = torch.randn(shape, generator=g).to(DEVICE, x_dtype)
    r = torch.randn(shape, generator=g).to(DEVICE, r_dtype) if r_dtype else None
    w = (1 + 0.3 * torch.randn(C, generator=g)).to(DEVICE)
    b = (0.3 * torch.randn(C, generator=g)).to(DEVICE)
    h_dtype = r_dtype or x_dtype
    dh = torch.randn(shape, generator=g).to(DEVICE, h_dtype)
    dy = torch.randn(shape, generator=g).to(DEVICE, h_dtype)
    seed = _seed(1234 + C)
    leaves = [_leaf(t) for t in (x, r, w, b) if t is not None]
    args = (leaves[0], leaves[1] if r is not None else None, *leaves[-2:])
    with poisoned_allocations():
        h, y = add_layer_norm(*args, dropout_p=p, seed=seed)
        grads = torch.autograd.grad([h, y], leaves, [dh, dy])
    keep = _dropout_mask(seed, shape, p)
    assert 0 < keep.sum() < keep.numel()
    h_ref, y_ref, grads_ref = _dropout_reference(x, r, w, b, dh, dy, keep.float(), p)
    assert h.dtype == h_dtype
    assert_close(h, h_ref.float(), _TOL_BY_DTYPE[h_dtype] if r is None else 0.0, "h")
    assert_close(y, y_ref, _TOL_BY_DTYPE[h_dtype], "y")
    names = ["dx", "dresidual", "dweight", "dbias"] if r is not None else ["dx", "dweight", "dbias"]
    for name, leaf, grad, ref in zip(names, leaves, grads, grads_ref):
        assert grad.dtype == leaf.dtype, name
        assert_close(grad, ref, _TOL_BY_DTYPE[grad.dtype], name)
    assert torch.all(grads[0][~keep] == 0), "a dropped element got a gradient"


def test_dropout_p_must_stay_below_one_in_float32():
    """The kernels compare and scale in float32: p = 1 - 1e-8 would be 1.0 there
    (everything dropped, 1 / (1 - p) infinite), so it is refused in one line;
    the largest float32 below 1 works, its rare kept elements scaled by 2**24."""
    x, r, w, b, _, _ = _make((3,), 17, torch.float32, seed=41, residual=True)
    with pytest.raises(ValueError, match=r"^add_layer_norm: dropout_p 0\.99999999 rounds to 1\.0 in float32"):
        add_layer_norm(x, r, w, b, dropout_p=1 - 1e-8)
    p = 1 - 2 ** -24
    seed = _seed(3)
    h, y = add_layer_norm(x, r, w, b, dropout_p=p, seed=seed)
    keep = _dropout_mask(seed, x.shape, p)
    assert_close(h, r.double() + x.double() * keep * 2.0 ** 24, RTOL[torch.float32], "h")
    assert torch.isfinite(y).all()


def test_a_seed_is_checked_whatever_dropout_p_is():
    """One seed rule, as documented: a seed given is checked even at p = 0 (a
    caller's mistake shows in every run), and there it is not used."""
    x, r, w, b, _, _ = _make((3,), 17, torch.float32, seed=42, residual=True)
    for p in (0.0, 0.25):
        with pytest.raises(TypeError, match="^add_layer_norm: seed has dtype float32; supported: int64"):
            add_layer_norm(x, r, w, b, dropout_p=p, seed=torch.zeros(1, device=DEVICE))
    plain = add_layer_norm(x, r, w, b)
    seeded = add_layer_norm(x, r, w, b, dropout_p=0.0, seed=_seed(5))
    assert all(torch.equal(a, c) for a, c in zip(plain, seeded))
    assert "a seed given is still checked, then not used" in " ".join(add_layer_norm.__doc__.split())


def test_dropout_zero_is_bit_identical_to_no_dropout():
    x, r, w, b, dy, dh = _make((3,), 257, torch.float32, seed=21, residual=True)

    def run(**kwargs):
        leaves = [_leaf(t) for t in (x, r, w, b)]
        h, y = add_layer_norm(*leaves, **kwargs)
        return [h, y, *torch.autograd.grad([h, y], leaves, [dh, dy])]
    for a, c in zip(run(), run(dropout_p=0.0, seed=_seed(99))):
        assert torch.equal(a, c)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_one_minus_p_and_reproduces_its_mask(p):
    shape = (16, 1024)
    n = shape[0] * shape[1]
    first = _dropout_mask(_seed(7), shape, p)
    kept = first.float().mean().item()
    standard_error = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) <= 4 * standard_error, f"kept {kept:.4f}, expected {1 - p}"
    assert torch.equal(first, _dropout_mask(_seed(7), shape, p)), "same seed, another mask"
    other = _dropout_mask(_seed(8), shape, p)
    assert (first != other).float().mean() > p * (1 - p), "another seed, (nearly) the same mask"
    # Rows differ from one another: the counter is the element's index, not its column.
    assert not torch.equal(first[0], first[1])


def test_dropout_mask_is_the_one_the_forward_used():
    """dropout(x) with x = 1 and no residual is keep / (1 - p): the forward's
    h is the materialised mask itself, scaled."""
    p, shape = 0.25, (5, 33)
    x = torch.ones(shape, device=DEVICE)
    w, b = torch.ones(33, device=DEVICE), torch.zeros(33, device=DEVICE)
    h, _ = add_layer_norm(x, None, w, b, dropout_p=p, seed=_seed(5))
    assert torch.equal(h, _dropout_mask(_seed(5), shape, p).float() / (1 - p))


def test_accumulate_grad_adds_weight_and_bias_gradients_into_grad():
    """accumulate_grad: dweight and dbias are added into the existing .grad by the
    reduction that sums them (autograd hands nothing over); without .grad they
    come through autograd as usual."""
    x, r, w, b, dy, dh = _make((5, 7), 48, torch.float32, seed=23, residual=True)
    ref = [_leaf(t) for t in (x, r, w, b)]
    h, y = add_layer_norm(*ref)
    torch.autograd.backward([h, y], [dh, dy])
    leaves = [_leaf(t) for t in (x, r, w, b)]
    leaves[2].grad, leaves[3].grad = torch.ones_like(w), torch.full_like(b, 2.0)
    grads = leaves[2].grad, leaves[3].grad
    with poisoned_allocations():
        h, y = add_layer_norm(*leaves, accumulate_grad=True)
        torch.autograd.backward([h, y], [dh, dy])
    assert leaves[2].grad is grads[0] and leaves[3].grad is grads[1], ".grad was replaced"
    assert_close(leaves[2].grad, 1.0 + ref[2].grad.double(), 1e-6, "dweight added into .grad")
    assert_close(leaves[3].grad, 2.0 + ref[3].grad.double(), 1e-6, "dbias added into .grad")
    for name, a, c in zip(("dx", "dresidual"), leaves[:2], ref[:2]):
        assert torch.equal(a.grad, c.grad), name


def test_first_block_without_residual_or_dropout():
    """residual=None, p = 0: h is x itself (no copy) and d(x) = dh + dLN(dy)."""
    x, _, w, b, dy, dh = _make((3,), 17, torch.float32, seed=22)
    xs, xt = _leaf(x), _leaf(x)
    with poisoned_allocations():
        h, y = add_layer_norm(xs, None, w, b)
        (dx,) = torch.autograd.grad([h, y], [xs], [dh, dy])
    assert h.data_ptr() == xs.data_ptr()
    yt = F.layer_norm(xt, (17,), w, b, 1e-5)
    (dxt,) = torch.autograd.grad([xt, yt], [xt], [dh, dy])
    assert_close(y, yt, RTOL[torch.float32], "y")
    assert_close(dx, dxt, RTOL[torch.float32], "dx")


def test_a_seed_changed_before_the_backward_is_an_error():
    x, r, w, b, dy, _ = _make((3,), 17, torch.float32, seed=23, residual=True)
    seed = _seed(3)
    _, y = add_layer_norm(_leaf(x), r, w, b, dropout_p=0.1, seed=seed)
    seed.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


@pytest.mark.gpu
def test_gpu_bf16_dropout_on_an_fp32_stream():
    C, shape, p = 768, (8, 1024, 768), 0.1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(DEVICE, torch.bfloat16)
    r = torch.randn(shape, generator=g).to(DEVICE)
    w, b = (1 + 0.1 * torch.randn(C, generator=g)).to(DEVICE), (0.1 * torch.randn(C, generator=g)).to(DEVICE)
    dh, dy = torch.randn(shape, generator=g).to(DEVICE), torch.randn(shape, generator=g).to(DEVICE, torch.bfloat16)
    seed = torch.randint(2**62, (1,), device=DEVICE)
    leaves = [_leaf(t) for t in (x, r, w, b)]
    h, y = add_layer_norm(*leaves, out_dtype=torch.bfloat16, dropout_p=p, seed=seed)
    grads = torch.autograd.grad([h, y], leaves, [dh, dy])
    keep = _dropout_mask(seed, shape, p)
    h_ref, y_ref, grads_ref = _dropout_reference(x, r, w, b, dh, dy, keep.float(), p)
    assert abs(keep.float().mean().item() - (1 - p)) <= 4 * (p * (1 - p) / keep.numel()) ** 0.5
    assert_close(h, h_ref, 1e-6, "h")
    assert_close(y, y_ref, _TOL_BY_DTYPE[torch.bfloat16], "y")
    for name, grad, ref in zip(("dx", "dresidual", "dweight", "dbias"), grads, grads_ref):
        assert_close(grad, ref, _TOL_BY_DTYPE[grad.dtype], name)


# ----------------------------------------------------------------------------- properties


def test_deterministic_and_inputs_untouched():
    """Same inputs twice: bit-identical outputs and grads. Neither forward nor
    backward writes into inputs, upstream grads or saved tensors."""
    C = 257
    x, r, w, b, dy, dh = _make((17,), C, torch.float32, seed=12, residual=True)
    originals = [t.clone() for t in (x, r, w, b, dy, dh)]

    def run():
        xs, rs, ws, bs = _leaf(x), _leaf(r), _leaf(w), _leaf(b)
        with poisoned_allocations():
            y = layer_norm(xs, ws, bs)
            g1 = _grads([y], [dy], [xs, ws, bs])
            h2, y2 = add_layer_norm(xs, rs, ws, bs)
            g2 = _grads([h2, y2], [dh, dy], [xs, rs, ws, bs])
        return [y.detach(), *g1, h2.detach(), y2.detach(), *g2]

    first, second = run(), run()
    for i, (a, c) in enumerate(zip(first, second)):
        assert torch.equal(a, c), f"result {i} differs between identical runs"
    for i, (t, o) in enumerate(zip((x, r, w, b, dy, dh), originals)):
        assert torch.equal(t, o), f"input {i} was modified"


def test_empty_rows_return_empty():
    C = 8
    for lead in [(0,), (2, 0)]:
        x, r, w, b, _, _ = _make(lead, C, torch.float32, seed=13, residual=True)
        xs, rs, ws, bs = _leaf(x), _leaf(r), _leaf(w), _leaf(b)
        with poisoned_allocations():
            y = layer_norm(xs, ws, bs)
            assert y.shape == x.shape
            y.sum().backward()
        assert xs.grad.shape == x.shape
        assert torch.equal(ws.grad, torch.zeros_like(w))
        assert torch.equal(bs.grad, torch.zeros_like(b))
        with poisoned_allocations():
            h, y = add_layer_norm(xs, rs, ws, bs)
            assert h.shape == y.shape == x.shape
            (h.sum() + y.sum()).backward()
        assert rs.grad.shape == x.shape


def test_offsets_are_int64():
    """Row offsets past 2**31 elements, cheaply: three rows 2**30 elements apart
    in one lazily allocated buffer (only the touched pages are committed). With
    int32 offset arithmetic the last row is read and written at a wrapped,
    negative offset, which crashes the process (seen with the interpreter), so
    the check runs in a child process and a crash fails this test cleanly."""
    repo = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c",
         "from tests.test_layernorm import _int64_offsets_check; _int64_offsets_check()"],
        cwd=repo, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, (
        f"int64 offset check failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _int64_offsets_check():
    """Run by test_offsets_are_int64 in a child process. The buffer is float16
    to keep its address space at 4 GiB."""
    C, stride = 16, 2 ** 30
    dtype = torch.float16
    try:
        buf = torch.empty(2 * stride + 4 * C, dtype=dtype, device=DEVICE)
    except RuntimeError as e:  # no room for the address space
        print(f"cannot reserve a 4 GiB buffer: {e}")
        sys.exit(77)

    def strided(slot, src):
        t = buf.as_strided((3, C), (stride, 1), storage_offset=slot * C)
        t.copy_(src)
        return t

    g = torch.Generator().manual_seed(14)
    vals = [torch.randn(3, C, generator=g).to(dtype).to(DEVICE) for _ in range(4)]
    x, r, dy, dh = (strided(i, v) for i, v in enumerate(vals))
    w = torch.randn(C, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(C, generator=g).to(dtype).to(DEVICE)
    rtol = RTOL[dtype]

    xs_strided = x.detach().requires_grad_(True)  # keep the 2**30 row stride
    with poisoned_allocations():
        y = layer_norm(xs_strided, w, bias)
        (dx,) = torch.autograd.grad(y, [xs_strided], dy)
    xt = _leaf(vals[0])
    yt = F.layer_norm(xt, (C,), w, bias, 1e-5)
    (dxt,) = torch.autograd.grad(yt, [xt], vals[2])
    assert_close(y, yt, rtol, "y (rows 2**30 apart)")
    assert_close(dx, dxt, rtol, "dx (rows 2**30 apart)")

    xa = x.detach().requires_grad_(True)
    with poisoned_allocations():
        h, y2 = add_layer_norm(xa, r, w, bias)
        (dxa,) = torch.autograd.grad([h, y2], [xa], [dh, dy])
    ht, yt2, dxt2, _, _, _ = _add_ln_reference(vals[0], vals[1], w, bias, vals[2], vals[3],
                                               C, use_dh=True)
    assert torch.equal(h, ht), "h (rows 2**30 apart)"
    assert_close(y2, yt2, rtol, "add: y (rows 2**30 apart)")
    assert_close(dxa, dxt2, rtol, "add: dx (rows 2**30 apart)")


# ----------------------------------------------------------------------------- bad inputs


def _ok(C=8, dtype=torch.float32, device=DEVICE):
    return (torch.randn(2, C, dtype=dtype, device=device),
            torch.randn(C, dtype=dtype, device=device),
            torch.randn(C, dtype=dtype, device=device))


def test_rejects_bad_inputs():
    x, w, b = _ok()
    meta = torch.device("meta")
    cases = [
        (ValueError, "layer_norm: x is on meta; a CUDA tensor is needed",
         lambda: layer_norm(x.to(meta), w.to(meta), b.to(meta))),
        (ValueError, "layer_norm: weight is on meta but x is on cpu; all tensors must be on one device",
         lambda: layer_norm(x, w.to(meta), b)),
        (ValueError, "add_layer_norm: residual is on meta but x is on cpu",
         lambda: add_layer_norm(x, x.to(meta), w, b)),
        (TypeError, "layer_norm: bias has dtype float64; supported: float32, float16, bfloat16",
         lambda: layer_norm(x, w, b.double())),
        (TypeError, "add_layer_norm: residual has dtype float64",
         lambda: add_layer_norm(x, x.double(), w, b)),
        (TypeError, "add_layer_norm: residual must be a torch.Tensor, got list",
         lambda: add_layer_norm(x, [1.0], w, b)),
        (ValueError, "add_layer_norm: seed has shape (2,); expected (1,)",
         lambda: add_layer_norm(x, x, w, b, dropout_p=0.5, seed=torch.zeros(2, dtype=torch.int64))),
        (ValueError, "add_layer_norm: dropout_p must be a finite real number >= 0.0 and < 1.0, got 1.0",
         lambda: add_layer_norm(x, x, w, b, dropout_p=1.0, seed=_seed(1))),
        (ValueError, "add_layer_norm: dropout_p must be a finite real number >= 0.0 and < 1.0, got -0.1",
         lambda: add_layer_norm(x, x, w, b, dropout_p=-0.1, seed=_seed(1))),
        (TypeError, "add_layer_norm: seed has dtype int32; supported: int64",
         lambda: add_layer_norm(x, x, w, b, dropout_p=0.1, seed=_seed(1).int())),
        (ValueError, "add_layer_norm: seed has shape (); expected (1,)",
         lambda: add_layer_norm(x, x, w, b, dropout_p=0.1, seed=_seed(1)[0])),
        (ValueError, "add_layer_norm: seed is on meta but x is on",
         lambda: add_layer_norm(x, x, w, b, dropout_p=0.1, seed=_seed(1).to("meta"))),
        (TypeError, "layer_norm: x has dtype int32",
         lambda: layer_norm(x.int(), w.int(), b.int())),
        (TypeError, "layer_norm: x has dtype float64",
         lambda: layer_norm(x.double(), w.double(), b.double())),
        (TypeError, "layer_norm: weight must be a torch.Tensor",
         lambda: layer_norm(x, None, b)),
        (ValueError, "layer_norm: weight has shape (9,); expected (8,)",
         lambda: layer_norm(x, torch.randn(9, device=DEVICE), b)),
        (ValueError, "layer_norm: weight has shape (1, 8); expected (8,)",
         lambda: layer_norm(x, w[None], b)),
        (ValueError, "layer_norm: bias has shape (4,); expected (8,)",
         lambda: layer_norm(x, w, b[:4])),
        (ValueError, "layer_norm: x has shape (); expected at least 1 dimension (..., C)",
         lambda: layer_norm(x[0, 0], w[:1], b[:1])),
        (ValueError, "layer_norm: x has last dimension 0",
         lambda: layer_norm(x[:, :0], w[:0], b[:0])),
        (ValueError, "add_layer_norm: residual has shape (1, 8); expected (2, 8)",
         lambda: add_layer_norm(x, x[:1], w, b)),
        (ValueError, "layer_norm: eps must be a finite real number >= 0.0, got -1.0",
         lambda: layer_norm(x, w, b, eps=-1.0)),
        (ValueError, "layer_norm: eps must be a finite real number >= 0.0, got inf",
         lambda: layer_norm(x, w, b, eps=float("inf"))),
    ]
    big = 65536 // 4 + 1
    cases.append((ValueError, f"layer_norm: x has last dimension {big}; at most 16384",
                  lambda: layer_norm(*_ok(C=big))))
    # The widest of x and residual sets the limit.
    half = 65536 // 2
    xh = torch.zeros(1, half, dtype=torch.float16, device=DEVICE)
    wh = torch.ones(half, device=DEVICE)
    cases.append((ValueError, f"add_layer_norm: x has last dimension {half}; at most 16384",
                  lambda: add_layer_norm(xh, xh.float(), wh, None)))
    for exc, msg, call in cases:
        with pytest.raises(exc) as info:
            call()
        assert str(info.value).startswith(msg), f"expected {msg!r}, got {str(info.value)!r}"


def test_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, b = _ok(device=torch.device("cpu"))
    with pytest.raises(ValueError, match="^layer_norm: x is on cpu; a CUDA tensor is needed"):
        layer_norm(x, w, b)
    with pytest.raises(ValueError, match="^add_layer_norm: x is on cpu"):
        add_layer_norm(x, x, w, b)


# ----------------------------------------------------------------------------- GPU only

GPU_SHAPES = [((16, 1024), 768), ((64,), 8192), ((17,), 1000)]


def _layer_norm_three_ways(x, w, b, dy):
    """(y, [dx, dw, db]) from the kernel (poisoned outputs), from F.layer_norm, and in float64."""
    C = x.shape[-1]
    xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
    with poisoned_allocations():
        y = layer_norm(xs, ws, bs)
        grads = _grads([y], [dy], [xs, ws, bs])
    xt, wt, bt = _leaf(x), _leaf(w), _leaf(b)
    yt = F.layer_norm(xt, (C,), wt, bt, 1e-5)
    grads_t = _grads([yt], [dy], [xt, wt, bt])
    y6, *grads_6 = _ln_ref64(x, w, b, dy)
    return (y, grads), (yt, grads_t), (y6, grads_6)


@pytest.mark.gpu
@pytest.mark.parametrize("lead,C", GPU_SHAPES, ids=lambda v: str(v))
def test_gpu_bf16_comparable(lead, C):
    dtype = torch.bfloat16
    x, r, w, b, dy, dh = _make(lead, C, dtype, seed=C, residual=True)
    (y, grads), (yt, grads_t), (y6, grads_6) = _layer_norm_three_ways(x, w, b, dy)
    assert_bf16_comparable(y, yt, y6, "y")
    for name, a, t, e in zip(("dx", "dweight", "dbias"), grads, grads_t, grads_6):
        assert_bf16_comparable(a, t, e, name)

    xs, rs, ws, bs = _leaf(x), _leaf(r), _leaf(w), _leaf(b)
    with poisoned_allocations():
        h, y = add_layer_norm(xs, rs, ws, bs)
        grads = _grads([h, y], [dh, dy], [xs, rs, ws, bs])
    ht, yt, *grads_t = _add_ln_reference(x, r, w, b, dy, dh, C, use_dh=True)
    y6, *grads_6 = _add_ln_ref64(x, r, w, b, dy, dh, use_dh=True)
    assert torch.equal(h, ht), "add: h differs from x + residual"
    assert_bf16_comparable(y, yt, y6, "add: y")
    for name, a, t, e in zip(("dx", "dresidual", "dweight", "dbias"), grads, grads_t, grads_6):
        assert_bf16_comparable(a, t, e, f"add: {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", GPU_SHAPES + [((4,), 65536 // 4)], ids=lambda v: str(v))
def test_gpu_real_shapes(lead, C, dtype):
    if 65536 // torch.tensor([], dtype=dtype).element_size() < C:
        pytest.skip("beyond this dtype's width limit")
    x, _, w, b, dy, _ = _make(lead, C, dtype, seed=C + 3)
    (y, grads), (yt, grads_t), (y6, grads_6) = _layer_norm_three_ways(x, w, b, dy)
    rtol = RTOL[dtype]
    _check("y", y, yt, y6, rtol)
    for name, a, t, e in zip(("dx", "dweight", "dbias"), grads, grads_t, grads_6):
        _check(name, a, t, e, rtol)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_more_than_2_31_elements():
    """A contiguous (2**21 + 3, 1024) bf16 tensor (> 2**31 elements): the last rows
    must match PyTorch on those rows alone."""
    C, rows = 1024, 2 ** 21 + 3
    g = torch.Generator(device=DEVICE).manual_seed(15)
    x = torch.randn(rows, C, device=DEVICE, dtype=torch.bfloat16, generator=g)
    w = torch.randn(C, device=DEVICE, dtype=torch.bfloat16, generator=g)
    b = torch.randn(C, device=DEVICE, dtype=torch.bfloat16, generator=g)
    xs = x.requires_grad_(True)
    y = layer_norm(xs, w, b)
    dy = torch.randn_like(x)
    (dx,) = torch.autograd.grad(y, [xs], dy)
    tail = slice(rows - 5, rows)
    xt = _leaf(x[tail].float())
    yt = F.layer_norm(xt, (C,), w.float(), b.float(), 1e-5)
    (dxt,) = torch.autograd.grad(yt, [xt], dy[tail].float())
    assert_close(y[tail].float(), yt, 1e-2, "y tail")
    assert_close(dx[tail].float(), dxt, 2e-2, "dx tail")


# ----------------------------------------------------------------------------- out_dtype


def _out_dtype_case(out_dtype, rows=17, width=257, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g).to(DEVICE)
    r = torch.randn(rows, width, generator=g).to(DEVICE)
    w = (1 + 0.1 * torch.randn(width, generator=g)).to(DEVICE)
    b = (0.1 * torch.randn(width, generator=g)).to(DEVICE)
    dy = torch.randn(rows, width, generator=g).to(DEVICE, out_dtype)
    dh = torch.randn(rows, width, generator=g).to(DEVICE)
    return x, r, w, b, dy, dh


@pytest.mark.parametrize("out_dtype", [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else []))
def test_out_dtype_matches_layer_norm_then_cast(out_dtype):
    """An fp32 residual stream normalised straight into the matmul dtype (autocast):
    y equals F.layer_norm(...).to(out_dtype), gradients flow back in fp32."""
    x, r, w, b, dy, dh = _out_dtype_case(out_dtype)
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    ref = [t.clone().requires_grad_() for t in (x, r, w, b)]
    with poisoned_allocations():
        h, y = add_layer_norm(*leaves, out_dtype=out_dtype)
        torch.autograd.backward([h, y], [dh, dy])
        y_plain = layer_norm(leaves[0].detach(), w, b, out_dtype=out_dtype)
    assert y.dtype == y_plain.dtype == out_dtype and h.dtype == torch.float32
    h_ref = ref[0] + ref[1]
    y_ref = F.layer_norm(h_ref, (x.shape[-1],), ref[2], ref[3]).to(out_dtype)
    torch.autograd.backward([h_ref, y_ref], [dh, dy])
    # One rounding of the same fp32 value: at most one ulp of out_dtype apart.
    assert_close(y, y_ref, RTOL[torch.float16] if out_dtype == torch.float16 else 8e-3, "y")
    assert_close(h, h_ref, 1e-6, "h")
    y_plain_ref = F.layer_norm(x, (x.shape[-1],), w, b).to(out_dtype)
    assert_close(y_plain, y_plain_ref, RTOL[torch.float16] if out_dtype == torch.float16 else 8e-3, "y")
    for name, a, e in zip(("dx", "dresidual", "dweight", "dbias"), leaves, ref):
        assert a.grad.dtype == torch.float32
        assert_close(a.grad, e.grad, 1e-5, name)


def test_bad_out_dtype():
    x, r, w, b, _, _ = _out_dtype_case(torch.float16, rows=2, width=8)
    with pytest.raises(TypeError, match="^layer_norm: out_dtype is int32; supported: float32, float16, bfloat16$"):
        layer_norm(x, w, b, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="^add_layer_norm: out_dtype is float64"):
        add_layer_norm(x, r, w, b, out_dtype=torch.float64)
