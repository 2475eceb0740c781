"""A linear layer whose bias and bias gradient live inside its matmuls: y = x @ W.T + b.

Math (rows of x: M, in_features: K, out_features: N):

    forward:  y  = x @ W.T + b
    backward: dx = dy @ W,   dW = dy.T @ x,   db = sum over rows of dy

Three launches of the shared Triton matmul (gpt2_kernels/_matmul.py), nothing
else: the forward adds the bias in its epilogue; the backward's dW matmul,
whose reduction already runs over every row of dy, also sums those rows into db
(its A operand is dy.T); dx is the third. Accumulation is fp32 throughout; dW
and db are written in the parameters' own dtypes, so fp32 master weights get
fp32 gradients that were never rounded to 16 bits.

Mixed precision without casts: x sets the compute dtype. The weight may be in
another dtype (fp32 master weights with bf16 activations); the matmuls then
read `compute_weight`, a copy of it in x's dtype that the caller keeps (the
optimizer's bf16 copy, written once per step), or, without one, a copy made
once per call, as autocast would. The bias is read in its own dtype and added
in fp32.

Gradient accumulation inside the matmul (`accumulate_grad`): where a parameter
already has a `.grad` of its shape and dtype, the backward adds dW (or db) to it
in the matmul's epilogue (beta = 1: one fp32 sum, rounded once) and hands
autograd nothing for it, instead of handing over a new tensor that autograd then
adds with a separate pass over the parameter. Meant for the training step's
`loss.backward()`: hooks on the parameter and `torch.autograd.grad` do not see
a gradient delivered this way.
"""
import math

import torch

from gpt2_kernels._common import (FLOAT_DTYPES, check_bool, check_same_device, check_tensor, contiguous,
                                  dtype_name, grad_buffer, on_device, once_differentiable)
from gpt2_kernels._matmul import matmul

# ----------------------------------------------------------------------------- launchers


def weight_gradients(dy2d, x2d, weight, bias, *, need_dw, need_db, accumulate):
    """(dW, db) for y = x @ W.T + b from one matmul, dW = dy.T @ x with db the
    row sums of its A operand dy.T. Each is None when not wanted or when it was
    added into the parameter's .grad (`accumulate`; see the module docstring)."""
    dw_target = grad_buffer(weight, accumulate) if need_dw else None
    db_target = grad_buffer(bias, accumulate) if need_db else None
    dw = db = None
    if need_dw:
        dw = dw_target if dw_target is not None else torch.empty_like(weight)
    if need_db:
        db = db_target if db_target is not None else torch.empty_like(bias)
    if need_dw:
        matmul(dy2d.t(), x2d, out=dw, accumulate=dw_target is not None,
               row_sum=db, row_sum_accumulate=db_target is not None)
    elif need_db:
        # A frozen weight: the bias gradient alone, without the matmul.
        sums = dy2d.float().sum(0)
        db.copy_(db.float() + sums if db_target is not None else sums)
    return (None if dw_target is not None else dw), (None if db_target is not None else db)


def compute_copy(weight: torch.Tensor, compute_weight: torch.Tensor | None, dtype) -> torch.Tensor:
    """What the matmuls read for `weight` in `dtype`: the caller's copy, the
    weight itself, or a conversion made now."""
    if compute_weight is not None:
        return compute_weight
    return weight if weight.dtype == dtype else weight.to(dtype)


def check_compute_weight(op: str, arg: str, compute_weight, weight: torch.Tensor, x: torch.Tensor) -> None:
    """A weight's copy in the compute dtype: None, or weight's shape in x's dtype."""
    check_tensor(op, arg, compute_weight, dtypes=FLOAT_DTYPES, shape=tuple(weight.shape), optional=True)
    if compute_weight is not None and compute_weight.dtype != x.dtype:
        raise TypeError(f"{op}: {arg} has dtype {dtype_name(compute_weight.dtype)}; it must be x's "
                        f"dtype ({dtype_name(x.dtype)}), the dtype the matmuls run in")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) as (M, K), a view where the leading dims allow."""
    # Explicit M: reshape(-1, K) is ambiguous when K == 0.
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


# ----------------------------------------------------------------------------- autograd


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, compute_weight, accumulate_grad):
        x2d = as_rows(x)
        w = compute_copy(weight, compute_weight, x.dtype)
        y = matmul(x2d, w.t(), x.dtype, bias=bias)
        # x only for dW; the weight's copy only for dx.
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None,
                              w if ctx.needs_input_grad[0] else None, weight, bias)
        ctx.x_shape = x.shape
        ctx.accumulate_grad = accumulate_grad
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable("linear")
    def backward(ctx, dy):
        x2d, w, weight, bias = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dy2d = as_rows(dy)
        dx = None
        if need_dx:
            dx = matmul(dy2d, w, w.dtype).view(ctx.x_shape)
        dw, db = weight_gradients(dy2d, x2d, weight, bias, need_dw=need_dw,
                                  need_db=need_db and bias is not None,
                                  accumulate=ctx.accumulate_grad)
        return dx, dw, db, None, None


# ----------------------------------------------------------------------------- public


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           compute_weight: torch.Tensor | None = None, accumulate_grad: bool = False) -> torch.Tensor:
    """y = x @ weight.T + bias in one Triton matmul (the bias in its epilogue), with
    gradients in two (db summed inside the dW matmul).

    Equals ``F.linear(x, weight.to(x.dtype), bias)`` with fp32 accumulation and
    the bias added in fp32 before the one rounding to x's dtype.

    x: (..., K), float32, float16 or bfloat16 (the compute dtype), any strides.
    weight: (N, K) in any of those dtypes; bias: (N,) or None, in any of them.
    compute_weight: None, or weight already converted to x's dtype (N, K), which
    the matmuls then read instead of converting weight once per call; it must
    hold weight's values rounded to x's dtype (the caller keeps it so).
    accumulate_grad: add weight's and bias's gradients into their existing
    `.grad` inside the dW matmul instead of returning them to autograd (see the
    module docstring); a parameter without a usable .grad gets its gradient
    through autograd as usual. All on one CUDA device (CPU only under
    TRITON_INTERPRET=1).

    Returns (..., N) in x's dtype, contiguous. dx comes in x's dtype, dweight in
    weight's and dbias in bias's, each accumulated in fp32. The backward is
    once-differentiable: a gradient through it taken with create_graph=True
    (double backward) raises (PyTorch's ops allow it).
    """
    op = "linear"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_dim=1, layout="(..., in_features)")
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES, dim=2, layout="(out_features, in_features)")
    check_tensor(op, "weight", weight, shape=(None, x.shape[-1]),
                 layout="(out_features, in_features) with x's in_features")
    check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, shape=(weight.shape[0],),
                 layout="(out_features,)", optional=True)
    check_compute_weight(op, "compute_weight", compute_weight, weight, x)
    check_same_device(op, x=x, weight=weight, bias=bias, compute_weight=compute_weight)
    check_bool(op, "accumulate_grad", accumulate_grad)
    bias = contiguous(bias)  # the epilogue reads it as flat memory
    with on_device(x):  # backward runs on autograd's thread for x's device
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            return _Linear.apply(x, weight, bias, compute_weight, accumulate_grad)
        w = compute_copy(weight, compute_weight, x.dtype)
        return matmul(as_rows(x), w.t(), x.dtype, bias=bias).view(*x.shape[:-1], weight.shape[0])
