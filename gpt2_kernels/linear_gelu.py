"""The first half of GPT-2's MLP as one fused op: y = gelu_tanh(x @ W.T + b).

Math, with pre = x @ W.T + b (rows of x: M, in_features: K, out_features: N):

    gelu_tanh(z)  = 0.5 z (1 + tanh(u)) = z * sigmoid(2u),   u = sqrt(2/pi) (z + 0.044715 z^3)
    gelu_tanh'(z) = s + 2 z s (1 - s) u',   s = sigmoid(2u),  u' = sqrt(2/pi) (1 + 3 * 0.044715 z^2)

    backward: dpre = dy * gelu_tanh'(pre);  dx = dpre @ W;  dW = dpre.T @ x;  db = sum over rows of dpre

Forward: one Triton matmul whose epilogue adds the bias, applies the GELU and
also stores the pre-activation for the backward. Backward: one elementwise pass
turns dy into dpre and writes per-row-block partial column sums for db, then the
same Triton matmul runs twice (dx and dW); db is the fp32 sum of the partials in
a fixed order (no atomics: bit-identical run to run). Accumulation is fp32
throughout.

For tests and benchmarks (not the public function) a `_Plan` can instead
recompute the pre-activation in the backward (one more matmul, M*N elements
less memory: the recompute matmul's epilogue produces dpre directly) and run any
of the three matmuls in torch.matmul (cuBLAS) with the GELU as a separate pass,
to measure each piece against cuBLAS.
"""
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpt2_kernels._common import (FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor,
                                  contiguous, on_device, once_differentiable, pick)
from gpt2_kernels._matmul import (EPILOGUE_GELU, EPILOGUE_GELU_GRAD, EPILOGUE_NONE, gelu_tanh,
                                  gelu_tanh_grad, matmul)

_EPILOGUE_NONE = EPILOGUE_NONE            # c = acc (+ bias)
_EPILOGUE_GELU = EPILOGUE_GELU            # pre = acc + bias; c = gelu(pre); optionally store pre
_EPILOGUE_GELU_GRAD = EPILOGUE_GELU_GRAD  # c = aux * gelu'(acc + bias): the recompute backward

# Elementwise tiles (BLOCK_M, BLOCK_N): 64 x 128 on a GPU keeps the db partial
# buffer small (M / 64 rows); fewer, larger programs under the interpreter,
# whose cost is per program.
_ELEMENTWISE_TILE_GPU = (64, 128)
_ELEMENTWISE_TILE_INTERPRETER = (32, 64)
# The column-sum reduction's tile (BLOCK_R partial rows per step, BLOCK_N columns).
_COLUMN_SUM_TILE_GPU = (32, 64)
_COLUMN_SUM_TILE_INTERPRETER = (8, 64)

_TRITON, _TORCH = "triton", "torch"


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _gelu_fwd_kernel(pre_ptr, y_ptr, M, N, stride_pm, stride_pn, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = gelu(pre); used only when the forward matmul runs in cuBLAS."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    z = tl.load(pre_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             gelu_tanh(z).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(g_ptr, pre_ptr, dpre_ptr, partial_ptr, M, N,
                     stride_gm, stride_gn, stride_pm, stride_pn, stride_dm,
                     COMPUTE_DPRE: tl.constexpr, WANT_DB: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dpre = g * gelu'(pre) over a (BLOCK_M, BLOCK_N) tile, plus the tile's
    column sums in fp32 into partial[pid_m, :] for the bias gradient.

    With COMPUTE_DPRE off, dpre is read (already computed by the recompute
    matmul's epilogue) and only the column sums are produced.
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    dpre_ptrs = dpre_ptr + offs_m[:, None] * stride_dm + offs_n[None, :]
    if COMPUTE_DPRE:
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=mask, other=0.0).to(tl.float32)
        z = tl.load(pre_ptr + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                    mask=mask, other=0.0).to(tl.float32)
        d = g * gelu_tanh_grad(z)
        tl.store(dpre_ptrs, d.to(dpre_ptr.dtype.element_ty), mask=mask)
    else:
        d = tl.load(dpre_ptrs, mask=mask, other=0.0).to(tl.float32)
    if WANT_DB:
        # Masked rows loaded as 0 contribute nothing. Summing the unrounded fp32
        # values keeps db at fp32 accuracy even for fp16/bf16 activations.
        tl.store(partial_ptr + pid_m.to(tl.int64) * N + offs_n, tl.sum(d, axis=0), mask=mask_n)


@triton.jit
def _column_sum_kernel(partial_ptr, out_ptr, R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n] = sum_r partial[r, n] in fp32, in a fixed order (deterministic)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    # BLOCK_R rows per step: a row-at-a-time loop would be one dependent
    # load latency per row.
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = (r0 + offs_r).to(tl.int64)
        acc += tl.load(partial_ptr + rows[:, None] * N + offs_n[None, :],
                       mask=(rows < R)[:, None] & mask_n[None, :], other=0.0)
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


# ----------------------------------------------------------------------------- launchers


def _matmul(a, b, out_dtype, *, bias=None, epilogue=_EPILOGUE_NONE, aux=None, store_aux=False):
    """The shared matmul (gpt2_kernels/_matmul.py), as this op uses it: a new
    contiguous (M, N) result."""
    return matmul(a, b, out_dtype, bias=bias, epilogue=epilogue, aux=aux, store_aux=store_aux)


def _elementwise_tile():
    return pick(gpu=_ELEMENTWISE_TILE_GPU, interpreter=_ELEMENTWISE_TILE_INTERPRETER)


def _gelu_forward(pre):
    M, N = pre.shape
    y = torch.empty((M, N), device=pre.device, dtype=pre.dtype)
    if y.numel() == 0:
        return y
    bm, bn = _elementwise_tile()
    _gelu_fwd_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        pre, y, M, N, pre.stride(0), pre.stride(1), y.stride(0), BLOCK_M=bm, BLOCK_N=bn)
    return y


def _gelu_backward(g, pre, dpre, want_db, db_dtype):
    """Fills dpre = g * gelu'(pre) (pre given) or reads the given dpre (pre None);
    returns (dpre, db or None)."""
    M, N = g.shape if g is not None else dpre.shape
    device = (g if g is not None else dpre).device
    compute = pre is not None
    if compute:
        dpre = torch.empty((M, N), device=device, dtype=pre.dtype)
    if not compute and not want_db:
        return dpre, None
    bm, bn = _elementwise_tile()
    rows = triton.cdiv(M, bm)
    partial = torch.empty((rows, N), device=device, dtype=torch.float32) if want_db else dpre
    if M > 0 and N > 0:
        _gelu_bwd_kernel[(rows, triton.cdiv(N, bn))](
            g if compute else dpre, pre if compute else dpre, dpre, partial, M, N,
            *(g.stride() if compute else (0, 0)), *(pre.stride() if compute else (0, 0)),
            dpre.stride(0),
            COMPUTE_DPRE=compute, WANT_DB=want_db, BLOCK_M=bm, BLOCK_N=bn)
    db = None
    if want_db:
        db = torch.empty((N,), device=device, dtype=db_dtype)
        if N > 0:
            # rows == 0 (M == 0) leaves the loop empty and writes zeros.
            br, bn = pick(gpu=_COLUMN_SUM_TILE_GPU, interpreter=_COLUMN_SUM_TILE_INTERPRETER)
            _column_sum_kernel[(triton.cdiv(N, bn),)](partial, db, rows, N, BLOCK_R=br, BLOCK_N=bn)
    return dpre, db


@dataclass(frozen=True)
class _Plan:
    """How `linear_gelu` computes. The default is what the public function runs;
    the others exist for tests and for measuring each piece against cuBLAS.

    recompute: store nothing extra in the forward and recompute the
        pre-activation in the backward (one more matmul, M*N*K*2 FLOPs, for
        M*N elements less memory), instead of storing it from the forward epilogue.
    forward, dx, dw: "triton" (our matmul, with its fused epilogue) or "torch"
        (torch.matmul, the GELU / GELU-grad then a separate Triton pass) for
        pre = x @ W.T + b (and its recompute), dx = dpre @ W and dW = dpre.T @ x.
    """

    recompute: bool = False
    forward: str = _TRITON
    dx: str = _TRITON
    dw: str = _TRITON

    def __post_init__(self):
        for name in ("forward", "dx", "dw"):
            value = getattr(self, name)
            if value not in (_TRITON, _TORCH):
                raise ValueError(f"_Plan: {name} is {value!r}; expected {_TRITON!r} or {_TORCH!r}")


def _linear(x2d, weight, bias, backend):
    """pre = x2d @ W.T + b (no activation), for the cuBLAS path and recompute."""
    if backend == _TORCH:
        pre = x2d @ weight.t()
        return pre + bias if bias is not None else pre
    return _matmul(x2d, weight.t(), x2d.dtype, bias=bias)


def _forward(x2d, weight, bias, store_pre, backend):
    """Returns (y, pre or None)."""
    if backend == _TORCH:
        pre = _linear(x2d, weight, bias, _TORCH)
        return _gelu_forward(pre), (pre if store_pre else None)
    M, N = x2d.shape[0], weight.shape[0]
    pre = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype) if store_pre else None
    y = _matmul(x2d, weight.t(), x2d.dtype, bias=bias, epilogue=_EPILOGUE_GELU,
                aux=pre, store_aux=store_pre)
    return y, pre


# ----------------------------------------------------------------------------- autograd


class _LinearGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, plan):
        need_dw = ctx.needs_input_grad[1]
        y, pre = _forward(x2d, weight, bias, store_pre=not plan.recompute, backend=plan.forward)
        ctx.plan = plan
        # x is needed only for dW and for recomputing pre; dropping it otherwise
        # lets the caller free it.
        keep_x = need_dw or plan.recompute
        ctx.save_for_backward(x2d if keep_x else None, weight, bias, pre)
        return y

    @staticmethod
    @once_differentiable("linear_gelu")
    def backward(ctx, dy):
        x2d, weight, bias, pre = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        dx = dw = db = None
        if not (need_dx or need_dw or need_db):
            return dx, dw, db, None
        plan = ctx.plan
        if plan.recompute:
            if plan.forward == _TRITON:
                # One matmul recomputes pre and turns dy into dpre in its
                # epilogue: pre is never written to memory.
                dpre = _matmul(x2d, weight.t(), x2d.dtype, bias=bias,
                               epilogue=_EPILOGUE_GELU_GRAD, aux=dy)
                dpre, db = _gelu_backward(None, None, dpre, need_db, weight.dtype)
            else:
                pre = _linear(x2d, weight, bias, _TORCH)
                dpre, db = _gelu_backward(dy, pre, None, need_db, weight.dtype)
        else:
            dpre, db = _gelu_backward(dy, pre, None, need_db, weight.dtype)
        if need_dx:
            dx = dpre @ weight if plan.dx == _TORCH else _matmul(dpre, weight, weight.dtype)
        if need_dw:
            dw = dpre.t() @ x2d if plan.dw == _TORCH else _matmul(dpre.t(), x2d, weight.dtype)
        return dx, dw, db, None


def _linear_gelu(x, weight, bias, plan: _Plan):
    """linear_gelu without the input checks, computed as `plan` says."""
    K = x.shape[-1]
    N = weight.shape[0]
    lead = x.shape[:-1]
    # Explicit M: reshape(-1, K) is ambiguous when K == 0.
    x2d = x.reshape(math.prod(lead), K)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    with on_device(x):  # backward runs on autograd's thread for x's device
        if needs_grad:
            y2d = _LinearGelu.apply(x2d, weight, bias, plan)
        else:
            # Inference: skip autograd and do not store the pre-activation.
            y2d, _ = _forward(x2d, weight, bias, store_pre=False, backend=plan.forward)
    return y2d.reshape(*lead, N)


# ----------------------------------------------------------------------------- public


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """y = gelu_tanh(x @ weight.T + bias) in one fused Triton matmul, with gradients.

    Equals ``F.gelu(F.linear(x, weight, bias), approximate="tanh")``.

    x: (..., K), float32, float16 or bfloat16, any strides (viewed as (M, K) with
    M = prod(leading dims); copied only when the leading dims cannot be
    flattened without a copy). weight: (N, K), nn.Linear's (out_features,
    in_features) layout, any strides; bias: (N,) or None, copied once with
    `.contiguous()` where it is not (a slice, or expanded with stride 0). All in
    x's dtype, on one CUDA device (CPU only under TRITON_INTERPRET=1).

    Returns (..., N) in x's dtype, contiguous; empty leading dims give an empty
    result. Accumulation is fp32 throughout and the bias gradient is summed in
    fp32. The forward stores the pre-activation (an (M, N) tensor in x's dtype)
    for the backward; without gradients nothing is stored. On a GPU, fp32 inputs
    use TF32 tensor cores exactly when PyTorch's matmuls would
    (``torch.backends.cuda.matmul.allow_tf32``). The backward is once-differentiable:
    a gradient through it taken with create_graph=True (double backward) raises
    (PyTorch's ops allow it).
    """
    op = "linear_gelu"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_dim=1, layout="(..., in_features)")
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES, dim=2,
                 layout="(out_features, in_features)")
    check_tensor(op, "weight", weight, shape=(None, x.shape[-1]),
                 layout="(out_features, in_features) with x's in_features")
    check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, shape=(weight.shape[0],),
                 layout="(out_features,)", optional=True)
    check_same_dtype(op, x=x, weight=weight, bias=bias)
    check_same_device(op, x=x, weight=weight, bias=bias)
    return _linear_gelu(x, weight, contiguous(bias), _Plan())
