"""Fused causal flash attention (gpt2_kernels/attention.py) against SDPA and float64.

On CPU the kernels run in Triton's interpreter, so the shapes here are small
and the tile sizes are the interpreter's (32x16 / 16x32): T = 17, 64, 128 and
257 still cross several block and diagonal boundaries. Real shapes and bf16
run on the GPU (`@pytest.mark.gpu`).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux only)")
import triton
import triton.language as tl

from gpt2_kernels import attention as attn_mod
from gpt2_kernels._common import SMEM_BUDGET_BYTES
from gpt2_kernels.attention import _dropout_keep, flash_attention, flash_attention_qkvpacked
from tests.helpers import (
    DEVICE,
    AtenRecorder,
    RTOL,
    assert_bf16_comparable,
    assert_close,
    poisoned_allocations,
)

# fp32 against SDPA and against float64; fp16 against float64.
TOL = {torch.float32: 1e-4, torch.float16: RTOL[torch.float16]}


# ----------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------
def causal_mask(tq, tk, device):
    """End-aligned: query i sits at position tk - tq + i."""
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return j <= (tk - tq + i)


def sdpa(q, k, v, causal, scale=None):
    """The PyTorch oracle. Its is_causal aligns top-left, so Tq < Tk needs an
    explicit mask."""
    tq, tk = q.shape[2], k.shape[2]
    if causal and tq != tk:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(tq, tk, q.device),
                                              scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def reference_fp64(q, k, v, causal, scale=None):
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def make_inputs(B, H, Tq, Tk, D, dtype, seed, layout="bhtd"):
    """q (B, H, Tq, D), k, v (B, H, Tk, D), leaf tensors requiring grad.

    layout="bthd" makes them (B, T, H, D) tensors seen through .transpose(1, 2)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for T in (Tq, Tk, Tk):
        if layout == "bthd":
            t = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
        else:
            t = torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype)
        out.append(t.requires_grad_())
    return out


def run_ours(q, k, v, do, causal, scale=None, tiles=None):
    """Forward and backward of our kernel, every allocation poisoned."""
    with poisoned_allocations():
        if tiles is None:
            o = flash_attention(q, k, v, causal=causal, sm_scale=scale)
        else:
            sm = q.shape[-1] ** -0.5 if scale is None else scale
            o = attn_mod._attention(q, k, v, attn_mod._Call(causal, sm, tiles=tiles))
    with poisoned_allocations():
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o, dq, dk, dv


def run_ref(fn, q, k, v, do, causal, scale=None, dtype=None):
    args = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    o = fn(*args, causal, scale)
    grads = torch.autograd.grad(o, args, do.to(o.dtype))
    return (o, *grads)


def assert_matches(actual, expected, tol, name):
    """Relative error, except for tensors that are zero in exact arithmetic
    (dq and dk when every query sees one key): there rounding noise of either
    side is judged against the O(1) scale of the gradients instead."""
    if expected.numel() and expected.abs().max().item() < 1e-6:
        err = actual.detach().double().abs().max().item()
        assert err <= tol, f"{name}: |error| {err:.3e} > {tol:.1e} where the exact value is 0"
    else:
        assert_close(actual, expected, tol, name)


def check_against_references(q, k, v, causal, tol, scale=None, seed=0, tiles=None):
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    do = torch.randn(q.shape, generator=g).to(DEVICE, q.dtype)
    ours = run_ours(q, k, v, do, causal, scale, tiles)
    exact = run_ref(reference_fp64, q, k, v, do, causal, scale, torch.float64)
    names = ("out", "dq", "dk", "dv")
    for name, a, e in zip(names, ours, exact):
        assert_matches(a, e, tol, f"{name} vs float64")
    if q.dtype == torch.float32:
        oracle = run_ref(sdpa, q, k, v, do, causal, scale)
        for name, a, e in zip(names, ours, oracle):
            assert_matches(a, e, tol, f"{name} vs SDPA")
    return ours


# ----------------------------------------------------------------------------
# correctness
# ----------------------------------------------------------------------------
# Every T in {1, 17, 64, 128, 257} and every D in {16, 32, 64, 128}, causal and
# not, odd B*H; trimmed so the interpreter stays inside the file's budget.
SHAPES = [  # B, H, T, D, causal
    (1, 3, 1, 64, True),
    (1, 3, 17, 16, True),
    (1, 3, 17, 32, False),
    (2, 1, 64, 32, True),
    (1, 1, 64, 128, False),
    (1, 1, 128, 128, True),
    (1, 3, 128, 16, False),
    (1, 1, 257, 64, True),
    (1, 1, 257, 16, False),
]


@pytest.mark.parametrize("B,H,T,D,causal", SHAPES)
def test_matches_sdpa_and_fp64_fp32(B, H, T, D, causal):
    q, k, v = make_inputs(B, H, T, T, D, torch.float32, seed=T * 1000 + D)
    check_against_references(q, k, v, causal, TOL[torch.float32])


@pytest.mark.parametrize("B,H,T,D,causal", [(1, 3, 17, 16, True), (2, 1, 64, 64, False),
                                            (1, 1, 128, 32, True)])
def test_fp16(B, H, T, D, causal):
    q, k, v = make_inputs(B, H, T, T, D, torch.float16, seed=7 + T)
    check_against_references(q, k, v, causal, TOL[torch.float16])


@pytest.mark.parametrize("causal", [True, False])
def test_transposed_bthd_input_without_copy(causal):
    q, k, v = make_inputs(2, 3, 33, 33, 32, torch.float32, seed=3, layout="bthd")
    assert not q.is_contiguous() and q.stride(-1) == 1
    check_against_references(q, k, v, causal, TOL[torch.float32])


def test_mixed_layouts():
    """q, k and v each with their own strides: q a slice of a fused (B, T, 3, H, D)
    qkv buffer, k a (B, T, H, D) transpose, v contiguous (B, H, T, D)."""
    B, H, T, D = 2, 3, 37, 16
    g = torch.Generator().manual_seed(12)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE)
    q = qkv[:, :, 0].transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, H, D, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()
    v = torch.randn(B, H, T, D, generator=g).to(DEVICE).requires_grad_()
    assert len({q.stride(), k.stride(), v.stride()}) == 3
    check_against_references(q, k, v, True, TOL[torch.float32])


@pytest.mark.parametrize("Tq,Tk,D,causal", [(1, 17, 32, True), (5, 70, 16, True),
                                            (40, 57, 64, True), (17, 64, 16, False)])
def test_decoding_tq_less_than_tk(Tq, Tk, D, causal):
    q, k, v = make_inputs(1, 3, Tq, Tk, D, torch.float32, seed=Tq + Tk)
    o, *grads = check_against_references(q, k, v, causal, TOL[torch.float32])
    assert all(torch.isfinite(t).all() for t in (o, *grads))


def test_custom_scale():
    q, k, v = make_inputs(1, 2, 40, 40, 32, torch.float32, seed=11)
    check_against_references(q, k, v, True, TOL[torch.float32], scale=0.37)


# Explicit tiles exercise stage boundaries that the single interpreter config
# cannot: BLOCK_M == BLOCK_N, BLOCK_M < BLOCK_N in the forward, and the
# opposite ratios in the backward.
def tiles(fwd, dkdv, dq):
    return attn_mod._Tiles(attn_mod._Tile(*fwd), attn_mod._Tile(*dkdv), attn_mod._Tile(*dq))


TILES = [
    tiles((16, 16, 1, 4), (16, 16, 1, 4), (16, 16, 1, 4)),
    tiles((16, 32, 1, 4), (32, 16, 1, 4), (16, 32, 1, 4)),
    tiles((64, 16, 1, 4), (16, 64, 1, 4), (64, 16, 1, 4)),
]


@pytest.mark.parametrize("fixed", TILES, ids=["16x16", "16x32", "64x16"])
@pytest.mark.parametrize("Tq,Tk,causal", [(70, 70, True), (70, 119, True), (50, 50, False)])
def test_tile_shapes(fixed, Tq, Tk, causal):
    q, k, v = make_inputs(1, 1, Tq, Tk, 16, torch.float32, seed=Tq * 7 + Tk)
    check_against_references(q, k, v, causal, TOL[torch.float32], tiles=fixed)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), H=st.integers(1, 3), Tq=st.integers(1, 40), extra=st.integers(0, 24),
       D=st.sampled_from([16, 32]), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_property_random_shapes(B, H, Tq, extra, D, causal, seed):
    q, k, v = make_inputs(B, H, Tq, Tq + extra, D, torch.float32, seed=seed)
    check_against_references(q, k, v, causal, TOL[torch.float32])


def test_lse_saved_for_backward():
    """The saved statistic is the row log-sum-exp of the scaled scores, in base 2."""
    q, k, v = make_inputs(1, 2, 37, 37, 16, torch.float32, seed=5)
    scale = 16 ** -0.5
    with poisoned_allocations():
        _, lse = attn_mod._forward(q.detach(), k.detach(), v.detach(), None,
                                   attn_mod._Call(True, scale))
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~causal_mask(37, 37, q.device), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 37)
    assert_close(lse, torch.logsumexp(s, dim=-1) / math.log(2), 1e-5, "lse")


def test_output_layout_is_bthd():
    q, k, v = make_inputs(2, 3, 17, 17, 16, torch.float32, seed=1)
    o = flash_attention(q, k, v)
    assert o.shape == (2, 3, 17, 16)
    assert o.transpose(1, 2).is_contiguous()


def test_stride_zero_grad_output():
    """`out.sum().backward()` hands the kernel a gradient with all strides 0."""
    q, k, v = make_inputs(1, 2, 20, 20, 16, torch.float32, seed=2)
    with poisoned_allocations():
        flash_attention(q, k, v).sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    sdpa(*ref, True).sum().backward()
    for name, a, r in zip("qkv", (q, k, v), ref):
        assert_close(a.grad, r.grad, TOL[torch.float32], f"d{name}")


@pytest.mark.parametrize("which", [0, 1, 2])
def test_only_some_inputs_need_grad(which):
    q, k, v = make_inputs(1, 1, 33, 33, 16, torch.float32, seed=4)
    inputs = [t.detach().requires_grad_(i == which) for i, t in enumerate((q, k, v))]
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    with poisoned_allocations():
        o = flash_attention(*inputs)
    with poisoned_allocations():
        o.backward(do)
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    sdpa(*ref, True).backward(do)
    for i, t in enumerate(inputs):
        if i == which:
            assert_close(t.grad, ref[i].grad, TOL[torch.float32], f"grad {i}")
        else:
            assert t.grad is None


def test_backward_is_deterministic():
    q, k, v = make_inputs(2, 1, 70, 70, 32, torch.float32, seed=8)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    first = run_ours(q, k, v, do, True)
    second = run_ours(q, k, v, do, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("Tq,Tk,causal", [(1, 1, True), (1, 1, False), (1, 30, True), (7, 40, True)])
def test_no_nan(Tq, Tk, causal):
    q, k, v = make_inputs(1, 2, Tq, Tk, 16, torch.float32, seed=Tq)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for t in run_ours(q, k, v, do, causal):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("loss", ["linear", "quadratic"])
@pytest.mark.parametrize("packed", [False, True], ids=["q,k,v", "qkvpacked"])
def test_double_backward_is_refused(packed, loss):
    """The backward kernels are not differentiable: asking for a graph of the
    gradients raises instead of giving a silently wrong second derivative, also
    when the loss is linear in the output (which torch's once_differentiable
    lets through: softmax's curvature would be dropped)."""
    qkv = make_qkv(1, 20, 2, 16, torch.float32, seed=6).requires_grad_()
    weights = torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    name = "flash_attention_qkvpacked" if packed else "flash_attention"
    o = flash_attention_qkvpacked(qkv) if packed else flash_attention(*unpack(qkv))
    objective = (o * weights).sum() if loss == "linear" else (o * o).sum()
    with pytest.raises(RuntimeError, match=f"^{name}: cannot differentiate twice"):
        torch.autograd.grad(objective, qkv, create_graph=True)


@pytest.mark.parametrize("B,H,Tq,Tk", [(0, 2, 8, 8), (1, 0, 8, 8), (1, 2, 0, 8), (1, 2, 0, 0)])
def test_empty(B, H, Tq, Tk):
    q, k, v = make_inputs(B, H, Tq, Tk, 16, torch.float32, seed=0)
    with poisoned_allocations():
        o = flash_attention(q, k, v, causal=True)
    assert o.shape == (B, H, Tq, 16)
    with poisoned_allocations():
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    assert dq.shape == q.shape and dk.shape == k.shape
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


# ----------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: (_t(1, 1, 4, 16, device="meta"),) * 3, ValueError, "CUDA tensor is needed"),
    (lambda: (_t(1, 1, 4, 16), _t(1, 1, 4, 16, device="meta"), _t(1, 1, 4, 16)),
     ValueError, "all tensors must be on one device"),
    (lambda: (_t(1, 1, 4, 16), _t(1, 1, 4, 16, dtype=torch.float16), _t(1, 1, 4, 16)),
     TypeError, "k has dtype"),
    (lambda: (_t(1, 1, 4, 16, dtype=torch.float64),) * 3, TypeError, "q has dtype"),
    (lambda: (_t(1, 4, 16), _t(1, 1, 4, 16), _t(1, 1, 4, 16)), ValueError, r"q has shape \(1, 4, 16\); expected 4-d"),
    (lambda: (_t(1, 1, 4, 96),) * 3, ValueError, "q has head dim 96; supported: 16, 32, 64, 128"),
    (lambda: (_t(1, 2, 4, 16), _t(1, 3, 4, 16), _t(1, 3, 4, 16)), ValueError, "k has shape"),
    (lambda: (_t(2, 1, 4, 16), _t(1, 1, 4, 16), _t(1, 1, 4, 16)), ValueError, "k has shape"),
    (lambda: (_t(1, 1, 4, 16), _t(1, 1, 4, 32), _t(1, 1, 4, 32)), ValueError, "k has shape"),
    (lambda: (_t(1, 1, 4, 16), _t(1, 1, 4, 16), _t(1, 1, 5, 16)), ValueError, "v has shape"),
    (lambda: (_t(1, 1, 4, 32)[..., ::2], _t(1, 1, 4, 16), _t(1, 1, 4, 16)),
     ValueError, "q has last-dimension stride 2"),
    (lambda: (_t(1, 1, 5, 16), _t(1, 1, 4, 16), _t(1, 1, 4, 16)), ValueError, "Tq <= Tk"),
    (lambda: ([[1.0]], _t(1, 1, 4, 16), _t(1, 1, 4, 16)), TypeError, "q must be a torch.Tensor"),
])
def test_bad_inputs(make, exc, match):
    with pytest.raises(exc, match=match) as info:
        flash_attention(*make())
    assert str(info.value).startswith("flash_attention: ")


def test_bad_arguments():
    q = _t(1, 1, 4, 16)
    for p in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="flash_attention: dropout_p must be a finite real"):
            flash_attention(q, q, q, dropout_p=p)
    with pytest.raises(TypeError, match="flash_attention: seed has dtype int32"):
        flash_attention(q, q, q, dropout_p=0.1, seed=torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"flash_attention: seed has shape \(2,\)"):
        flash_attention(q, q, q, dropout_p=0.1, seed=torch.zeros(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="flash_attention: seed is on meta"):
        flash_attention(q, q, q, dropout_p=0.1, seed=torch.zeros(1, dtype=torch.int64, device="meta"))
    with pytest.raises(TypeError, match="flash_attention: causal"):
        flash_attention(q, q, q, causal="yes")
    with pytest.raises(ValueError, match="flash_attention: sm_scale"):
        flash_attention(q, q, q, sm_scale=float("nan"))
    with pytest.raises(ValueError, match="flash_attention: k has no keys"):
        flash_attention(q, _t(1, 1, 0, 16), _t(1, 1, 0, 16), causal=False)


# ----------------------------------------------------------------------------
# packed qkv
# ----------------------------------------------------------------------------
def make_qkv(B, T, H, D, dtype, seed, pad=0):
    """A (B, T, 3, H, D) view of a (B, T, 3*H*D + pad) buffer, as the qkv
    projection's output is viewed (pad > 0 makes the rows strided)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    buf = torch.randn(B, T, 3 * H * D + pad, generator=g).to(DEVICE, dtype)
    return buf[..., :3 * H * D].view(B, T, 3, H, D) if pad == 0 else \
        buf[..., :3 * H * D].unflatten(-1, (3, H, D))


def unpack(qkv):
    return [t.transpose(1, 2) for t in qkv.unbind(2)]


@pytest.mark.parametrize("B,T,H,D,causal,dtype,pad", [
    (2, 37, 3, 16, True, torch.float32, 0),
    (1, 64, 2, 32, False, torch.float32, 8),
    (1, 33, 2, 64, True, torch.float16, 16),
])
def test_qkvpacked_matches_sdpa(B, T, H, D, causal, dtype, pad):
    qkv = make_qkv(B, T, H, D, dtype, seed=T + D, pad=pad).requires_grad_()
    assert (qkv.stride(-1) == 1) and (pad == 0) == qkv.is_contiguous()
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    with poisoned_allocations():
        o = flash_attention_qkvpacked(qkv, causal=causal)
    assert o.shape == (B, H, T, D) and o.transpose(1, 2).is_contiguous()
    with poisoned_allocations():
        (dqkv,) = torch.autograd.grad(o, qkv, do)
    assert dqkv.shape == qkv.shape
    ours = (o, *(t.transpose(1, 2) for t in dqkv.unbind(2)))
    names = ("out", "dq", "dk", "dv")
    exact = run_ref(reference_fp64, *unpack(qkv), do, causal, None, torch.float64)
    for name, a, e in zip(names, ours, exact):
        assert_matches(a, e, TOL[dtype], f"{name} vs float64")
    if dtype == torch.float32:
        oracle = run_ref(sdpa, *unpack(qkv), do, causal)
        for name, a, e in zip(names, ours, oracle):
            assert_matches(a, e, TOL[dtype], f"{name} vs SDPA")
        # The same kernels as the unpacked entry: identical bits.
        unpacked = run_ours(*(t.detach().requires_grad_() for t in unpack(qkv)), do, causal)
        for name, a, b in zip(names, ours, unpacked):
            assert torch.equal(a, b), f"{name}: packed and unpacked entries differ"


# Ops that would copy, gather or accumulate a whole gradient.
_COPYING_OPS = {"copy_", "_copy_from", "clone", "contiguous", "cat", "stack", "_to_copy",
                "add", "add_", "zeros", "new_zeros", "zeros_like", "zero_", "fill_",
                "select_backward", "slice_backward", "select_scatter", "slice_scatter",
                "as_strided_scatter", "index_put", "index_put_"}


def _copies(recorder, at_least):
    return [(name, n) for name, n in recorder.ops if name in _COPYING_OPS and n >= at_least]


def _model_like_backward(attend, B, T, H, D):
    """x @ W -> (B, T, 3, H, D) -> attention -> (B, T, H*D), as the model uses
    it; returns the ops of the backward pass and the grads of x and W."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B * T, 32, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(32, 3 * H * D, generator=g) / 32 ** 0.5).to(DEVICE).requires_grad_()
    weight = torch.randn(B, T, H * D, generator=g).to(DEVICE)
    qkv = (x @ w).view(B, T, 3, H, D)
    y = attend(qkv).transpose(1, 2).reshape(B, T, H * D)
    loss = (y * weight).sum()
    with AtenRecorder() as recorder:
        loss.backward()
    return recorder, x.grad, w.grad


def test_qkvpacked_backward_gathers_nothing():
    """The packed backward writes dq, dk, dv into one packed gradient: no
    activation-sized copy, stack, clone or add anywhere in the backward --
    where the unpacked entry on views of the same qkv stacks its three grads."""
    B, T, H, D = 2, 24, 2, 16
    packed, dx, dw = _model_like_backward(flash_attention_qkvpacked, B, T, H, D)
    unpacked, dx_ref, dw_ref = _model_like_backward(lambda qkv: flash_attention(*unpack(qkv)),
                                                    B, T, H, D)
    activation = B * T * H * D
    assert _copies(unpacked, activation), "the recorder saw no copy where autograd must stack"
    assert not _copies(packed, activation), f"activation-sized copies: {_copies(packed, activation)}"
    assert_close(dx, dx_ref, TOL[torch.float32], "dx")
    assert_close(dw, dw_ref, TOL[torch.float32], "dw")


@pytest.mark.parametrize("make,exc,match", [
    (lambda: _t(1, 4, 3, 2), ValueError, r"qkv has shape \(1, 4, 3, 2\); expected 5-d"),
    (lambda: _t(1, 4, 2, 1, 16), ValueError, "expected \\(\\*, \\*, 3, \\*, \\*\\)"),
    (lambda: _t(1, 4, 3, 1, 48), ValueError, "qkv has head dim 48"),
    (lambda: _t(1, 4, 3, 1, 32)[..., ::2], ValueError, "qkv has last-dimension stride 2"),
    (lambda: torch.zeros(1, 4, 3, 1, 16, dtype=torch.int32, device=DEVICE), TypeError,
     "qkv has dtype int32"),
    (lambda: _t(1, 4, 3, 1, 16, device="meta"), ValueError, "CUDA tensor is needed"),
])
def test_qkvpacked_bad_inputs(make, exc, match):
    with pytest.raises(exc, match=match) as info:
        flash_attention_qkvpacked(make())
    assert str(info.value).startswith("flash_attention_qkvpacked: ")


# ----------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------
@triton.jit
def _dropout_mask_kernel(SEED, MASK, Tq, Tk, dropout_p,
                         BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """MASK[bh, i, j] = whether the attention kernels keep P[bh, i, j]: the
    same Philox stream, materialised (tests only)."""
    bh = tl.program_id(0)
    rows = (tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q))[:, None]
    seed = tl.load(SEED)
    for start in range(0, Tk, BLOCK_K):
        cols = (start + tl.arange(0, BLOCK_K))[None, :]
        keep = _dropout_keep(seed, bh, rows, cols, dropout_p)
        tl.store(MASK + (bh * Tq + rows).to(tl.int64) * Tk + cols, keep.to(tl.int8),
                 mask=(rows < Tq) & (cols < Tk))


def dropout_mask(seed, B, H, Tq, Tk, p):
    """The (B, H, Tq, Tk) keep-mask that `seed` draws."""
    mask = torch.empty(B * H, Tq, Tk, dtype=torch.int8, device=DEVICE)
    _dropout_mask_kernel[(B * H, triton.cdiv(Tq, 32))](seed, mask, Tq, Tk, p,
                                                       BLOCK_Q=32, BLOCK_K=64)
    return mask.view(B, H, Tq, Tk).bool()


def reference_dropout(q, k, v, causal, mask, p, dtype=torch.float64):
    """SDPA's dropout with an explicit keep-mask: (softmax(s) * mask / (1 - p)) @ v."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return (torch.softmax(s, dim=-1) * mask / (1 - p)) @ v


def make_seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("packed", [False, True], ids=["q,k,v", "qkvpacked"])
def test_dropout_p_and_seed_rules(packed):
    """p must stay below 1 in float32, the kernels' precision (1 - 1e-8 would be
    1.0 there: 1 / (1 - p) infinite); the largest float32 below 1 works. A seed
    given is checked whatever p is, and is not used at p = 0 -- as documented."""
    qkv = make_qkv(1, 8, 1, 16, torch.float32, seed=40)
    q, k, v = unpack(qkv)
    name = "flash_attention_qkvpacked" if packed else "flash_attention"

    def call(**kw):
        return flash_attention_qkvpacked(qkv, **kw) if packed else flash_attention(q, k, v, **kw)

    with pytest.raises(ValueError, match=rf"^{name}: dropout_p 0\.99999999 rounds to 1\.0 in float32"):
        call(dropout_p=1 - 1e-8)
    p = 1 - 2 ** -24
    o = call(dropout_p=p, seed=make_seed(4))
    mask = dropout_mask(make_seed(4), 1, 1, 8, 8, p)
    assert_close(o, reference_dropout(q, k, v, True, mask, p), 1e-5, "o at p = 1 - 2**-24")
    with pytest.raises(TypeError, match=f"^{name}: seed has dtype int32"):
        call(dropout_p=0.0, seed=torch.zeros(1, dtype=torch.int32, device=DEVICE))
    assert torch.equal(call(dropout_p=0.0, seed=make_seed(5)), call())
    assert "Checked whatever dropout_p is" in " ".join(flash_attention.__doc__.split())


def test_dropout_zero_is_the_plain_path():
    q, k, v = make_inputs(2, 3, 37, 37, 16, torch.float32, seed=30)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(31)).to(DEVICE)
    plain = run_ours(q, k, v, do, True)
    with poisoned_allocations():
        o = flash_attention(q, k, v, dropout_p=0.0, seed=make_seed(7))
        grads = torch.autograd.grad(o, (q, k, v), do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), plain, (o, *grads)):
        assert torch.equal(a, b), f"{name} differs at dropout_p=0"


def test_dropout_seed_reproduces_and_changes_the_mask():
    q, k, v = make_inputs(1, 2, 40, 40, 16, torch.float32, seed=32)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(33)).to(DEVICE)

    def run(seed):
        o = flash_attention(q, k, v, dropout_p=0.25, seed=seed)
        return (o, *torch.autograd.grad(o, (q, k, v), do))
    first, again, other = run(make_seed(11)), run(make_seed(11)), run(make_seed(12))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    # Without a seed, each call draws one from the default generator.
    torch.manual_seed(5)
    drawn = flash_attention(q, k, v, dropout_p=0.25)
    torch.manual_seed(5)
    assert torch.equal(flash_attention(q, k, v, dropout_p=0.25), drawn)
    assert not torch.equal(flash_attention(q, k, v, dropout_p=0.25), drawn)


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,p", [
    (2, 2, 37, 37, 16, True, 0.2),
    (1, 3, 50, 50, 32, False, 0.5),
    (1, 2, 9, 70, 16, True, 0.1),  # decoding: queries at the end of the keys
])
def test_dropout_gradients_exact_for_the_mask_drawn(B, H, Tq, Tk, D, causal, p):
    q, k, v = make_inputs(B, H, Tq, Tk, D, torch.float32, seed=Tq + D)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(34)).to(DEVICE)
    seed = make_seed(1000 + Tq)
    with poisoned_allocations():
        o = flash_attention(q, k, v, causal=causal, dropout_p=p, seed=seed)
    with poisoned_allocations():
        ours = (o, *torch.autograd.grad(o, (q, k, v), do))
    mask = dropout_mask(seed, B, H, Tq, Tk, p)
    assert 0 < mask.float().mean() < 1
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_o = reference_dropout(*refs, causal, mask, p)
    exact = (ref_o, *torch.autograd.grad(ref_o, refs, do.double()))
    for name, a, e in zip(("out", "dq", "dk", "dv"), ours, exact):
        assert_matches(a, e, TOL[torch.float32], f"{name} vs the explicit mask")


def test_dropout_qkvpacked_draws_the_same_mask():
    qkv = make_qkv(1, 33, 2, 16, torch.float32, seed=35).requires_grad_()
    do = torch.randn(1, 2, 33, 16, generator=torch.Generator().manual_seed(36)).to(DEVICE)
    o = flash_attention_qkvpacked(qkv, dropout_p=0.3, seed=make_seed(9))
    (dqkv,) = torch.autograd.grad(o, qkv, do)
    unpacked = [t.detach().requires_grad_() for t in unpack(qkv)]
    o_ref = flash_attention(*unpacked, dropout_p=0.3, seed=make_seed(9))
    grads = torch.autograd.grad(o_ref, unpacked, do)
    assert torch.equal(o, o_ref)
    for a, b in zip((t.transpose(1, 2) for t in dqkv.unbind(2)), grads):
        assert torch.equal(a, b)


def test_dropout_is_unbiased():
    """With v = 1 every output row is sum_j M_ij P_ij / (1 - p): mean 1."""
    B, H, T, D, p = 2, 4, 128, 16, 0.3
    q, k, _ = make_inputs(B, H, T, T, D, torch.float32, seed=37)
    v = torch.ones(B, H, T, D, device=DEVICE)
    o = flash_attention(q, k, v, causal=False, dropout_p=p, seed=make_seed(21))[..., 0].flatten()
    stderr = o.std().item() / o.numel() ** 0.5
    assert abs(o.mean().item() - 1) <= 4 * stderr, (o.mean().item(), stderr)


def test_dropout_keeps_one_minus_p():
    B, H, T, p = 2, 4, 128, 0.3
    mask = dropout_mask(make_seed(22), B, H, T, T, p)
    n = mask.numel()
    kept = mask.float().mean().item()
    assert abs(kept - (1 - p)) <= 4 * (p * (1 - p) / n) ** 0.5, kept
    # Heads and batches draw their own masks.
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])


# ----------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------
def _bf16_check(B, H, Tq, Tk, D, causal, seed):
    q, k, v = make_inputs(B, H, Tq, Tk, D, torch.bfloat16, seed=seed)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, torch.bfloat16)
    ours = run_ours(q, k, v, do, causal)
    theirs = run_ref(sdpa, q, k, v, do, causal)
    exact = run_ref(reference_fp64, q, k, v, do, causal, None, torch.float64)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
        assert a.dtype == torch.bfloat16
        assert_bf16_comparable(a, t, e, name)


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Tq,Tk,D,causal", [
    (16, 12, 1024, 1024, 64, True),  # GPT-2 small
    (2, 3, 257, 257, 128, True),
    (1, 5, 333, 333, 32, False),
    (2, 2, 1, 1, 16, True),
    (2, 4, 77, 500, 64, True),  # decoding
])
def test_gpu_bf16(B, H, Tq, Tk, D, causal):
    _bf16_check(B, H, Tq, Tk, D, causal, seed=Tq + D)


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Tq,Tk,D,causal", [(4, 12, 1024, 1024, 64, True),
                                                (2, 3, 257, 257, 128, False)])
def test_gpu_dropout_bf16(B, H, Tq, Tk, D, causal):
    """bf16 with dropout against the explicit-mask formula: our error within 2x
    of PyTorch's own bf16 error, forward and backward."""
    p = 0.1
    q, k, v = make_inputs(B, H, Tq, Tk, D, torch.bfloat16, seed=Tq)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    seed = make_seed(77)
    o = flash_attention(q, k, v, causal=causal, dropout_p=p, seed=seed)
    ours = (o, *torch.autograd.grad(o, (q, k, v), do))
    mask = dropout_mask(seed, B, H, Tq, Tk, p)
    results = {}
    for dtype in (torch.bfloat16, torch.float64):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = reference_dropout(*leaves, causal, mask, p, dtype)
        results[dtype] = (out, *torch.autograd.grad(out, leaves, do.to(dtype)))
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, results[torch.bfloat16],
                             results[torch.float64]):
        assert a.dtype == torch.bfloat16
        assert_bf16_comparable(a, t, e, f"{name} with dropout")


@pytest.mark.gpu
def test_gpu_repeat_is_bit_identical():
    """Races in the kernels would show as run-to-run differences."""
    q, k, v = make_inputs(16, 12, 1024, 1024, 64, torch.bfloat16, seed=0)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    first = run_ours(q, k, v, do, True)
    for _ in range(20):
        again = run_ours(q, k, v, do, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def _fitting(tiles, kind, D, elsize):
    """The tiles the pruner keeps for this head dim and element size."""
    return [t for t in tiles if t.offered(D, dropout=False) and attn_mod._smem_bytes(
        kind, t.block_m, t.block_n, t.num_stages, D, elsize) <= SMEM_BUDGET_BYTES]


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_every_autotune_config(D, dtype):
    """Autotune may pick any config for some shape: each must be right."""
    elsize = torch.empty((), dtype=dtype).element_size()
    fp32 = dtype == torch.float32  # float32 has its own (smaller) tiles
    fwd = _fitting(attn_mod._FWD_TILES_FP32 if fp32 else attn_mod._FWD_TILES, "fwd", D, elsize)
    dkdv = _fitting(attn_mod._DKDV_TILES_FP32 if fp32 else attn_mod._DKDV_TILES, "dkdv", D, elsize)
    dq = _fitting(attn_mod._DQ_TILES_FP32 if fp32 else attn_mod._DQ_TILES, "dq", D, elsize)
    # Pair the lists cyclically so each config runs at least once.
    n = max(len(fwd), len(dkdv), len(dq))
    for Tq, Tk, causal in [(300, 300, True), (45, 300, True), (300, 300, False)]:
        q, k, v = make_inputs(2, 3, Tq, Tk, D, dtype, seed=Tq + Tk + D)
        do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
        theirs = run_ref(sdpa, q, k, v, do, causal)
        exact = run_ref(reference_fp64, q, k, v, do, causal, None, torch.float64)
        for i in range(n):
            fixed = attn_mod._Tiles(fwd[i % len(fwd)], dkdv[i % len(dkdv)], dq[i % len(dq)])
            ours = run_ours(q, k, v, do, causal, tiles=fixed)
            for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, theirs, exact):
                if fp32:
                    assert_close(a, e, TOL[torch.float32], f"{name} tiles={fixed} Tq={Tq} Tk={Tk}")
                else:
                    assert_bf16_comparable(a, t, e, f"{name} tiles={fixed} Tq={Tq} Tk={Tk}")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_fp32_is_ieee_exact(causal):
    q, k, v = make_inputs(2, 12, 512, 512, 64, torch.float32, seed=21)
    check_against_references(q, k, v, causal, TOL[torch.float32])


@pytest.mark.gpu
def test_gpu_offsets_beyond_int32():
    """Batch stride just under 2**30 fits int32, but batch 2 starts past 2**31
    elements: program-id offsets must be computed in int64."""
    B, H, T, D = 3, 2, 64, 64
    stride_b = 2**30 + 512
    try:
        base = torch.zeros((B - 1) * stride_b + H * T * D, device=DEVICE, dtype=torch.float16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a > 2**31-element buffer")
    vals = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.float16)
    x = base.as_strided((B, H, T, D), (stride_b, T * D, D, 1))
    x.copy_(vals)
    with poisoned_allocations():
        o_big = flash_attention(x, x, x)
        o_small = flash_attention(vals, vals, vals)
    assert torch.equal(o_big, o_small)
