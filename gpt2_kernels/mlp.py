"""GPT-2's MLP as one op whose elementwise work lives in its matmuls:
y = gelu_tanh(x @ W1.T + b1) @ W2.T + b2.

Math (rows of x: M, widths C -> H -> N; gelu_tanh and its derivative as in
gpt2_kernels/_matmul.py):

    forward:  pre = x @ W1.T + b1,  h = gelu_tanh(pre),  y = h @ W2.T + b2
    backward: dpre = (dy @ W2) * gelu_tanh'(pre)
              dW2 = dy.T @ h,   db2 = sum over rows of dy
              dx  = dpre @ W1,  dW1 = dpre.T @ x,  db1 = sum over rows of dpre

Six launches of the shared Triton matmul and nothing else. The forward's first
matmul adds b1, stores the pre-activation and writes h = gelu(pre) from its
epilogue; the second adds b2. The backward applies the GELU derivative in the
epilogue of the matmul that produces h's gradient (dy @ W2, reading the saved
pre-activation), so no separate GELU-backward pass reads and writes the
H-wide activations; each bias gradient comes out of the dW matmul that already
reads its rows (gpt2_kernels/linear.py). Accumulation is fp32 throughout.

Mixed precision and gradient accumulation inside the matmuls work as in
gpt2_kernels/linear.py: x sets the compute dtype, each weight may come with a
copy in x's dtype (`fc_compute_weight`, `proj_compute_weight`), and
`accumulate_grad` adds the parameters' gradients into their existing `.grad`.
"""
import torch

from gpt2_kernels._common import (FLOAT_DTYPES, check_bool, check_same_device, check_tensor, contiguous,
                                  on_device, once_differentiable)
from gpt2_kernels._matmul import EPILOGUE_GELU, EPILOGUE_TIMES_GELU_GRAD, matmul
from gpt2_kernels.linear import as_rows, check_compute_weight, compute_copy, weight_gradients

# ----------------------------------------------------------------------------- launchers


def _forward(x2d, w1, b1, w2, b2, store_pre):
    """(y, h, pre or None) with the weights already in x's dtype."""
    pre = (torch.empty((x2d.shape[0], w1.shape[0]), device=x2d.device, dtype=x2d.dtype)
           if store_pre else None)
    h = matmul(x2d, w1.t(), x2d.dtype, bias=b1, epilogue=EPILOGUE_GELU, aux=pre, store_aux=store_pre)
    return matmul(h, w2.t(), x2d.dtype, bias=b2), h, pre


# ----------------------------------------------------------------------------- autograd


class _Mlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fc_weight, fc_bias, proj_weight, proj_bias, fc_compute, proj_compute,
                accumulate_grad):
        x2d = as_rows(x)
        w1 = compute_copy(fc_weight, fc_compute, x.dtype)
        w2 = compute_copy(proj_weight, proj_compute, x.dtype)
        y, h, pre = _forward(x2d, w1, fc_bias, w2, proj_bias, store_pre=True)
        ctx.save_for_backward(x2d, w1, w2, pre, h, fc_weight, fc_bias, proj_weight, proj_bias)
        ctx.x_shape = x.shape
        ctx.accumulate_grad = accumulate_grad
        return y.view(*x.shape[:-1], proj_weight.shape[0])

    @staticmethod
    @once_differentiable("mlp")
    def backward(ctx, dy):
        x2d, w1, w2, pre, h, fc_weight, fc_bias, proj_weight, proj_bias = ctx.saved_tensors
        need_dx, need_dw1, need_db1, need_dw2, need_db2 = ctx.needs_input_grad[:5]
        need_db1 = need_db1 and fc_bias is not None
        need_db2 = need_db2 and proj_bias is not None
        dy2d = as_rows(dy)
        accumulate = ctx.accumulate_grad
        dw2, db2 = weight_gradients(dy2d, h, proj_weight, proj_bias, need_dw=need_dw2,
                                    need_db=need_db2, accumulate=accumulate)
        dx = dw1 = db1 = None
        if need_dx or need_dw1 or need_db1:
            # h's gradient, turned into pre's by the GELU derivative in the epilogue.
            dpre = matmul(dy2d, w2, x2d.dtype, epilogue=EPILOGUE_TIMES_GELU_GRAD, aux=pre)
            if need_dx:
                dx = matmul(dpre, w1, x2d.dtype).view(ctx.x_shape)
            dw1, db1 = weight_gradients(dpre, x2d, fc_weight, fc_bias, need_dw=need_dw1,
                                        need_db=need_db1, accumulate=accumulate)
        return dx, dw1, db1, dw2, db2, None, None, None


# ----------------------------------------------------------------------------- public


def mlp(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None,
        proj_weight: torch.Tensor, proj_bias: torch.Tensor | None, *,
        fc_compute_weight: torch.Tensor | None = None, proj_compute_weight: torch.Tensor | None = None,
        accumulate_grad: bool = False) -> torch.Tensor:
    """GPT-2's MLP, y = gelu_tanh(x @ fc_weight.T + fc_bias) @ proj_weight.T + proj_bias,
    in two Triton matmuls forward and four backward (see the module docstring).

    Equals ``F.linear(F.gelu(F.linear(x, W1, b1), approximate="tanh"), W2, b2)``
    with the weights converted to x's dtype, fp32 accumulation, and the hidden
    activation rounded once to x's dtype.

    x: (..., C), float32, float16 or bfloat16 (the compute dtype), any strides.
    fc_weight: (H, C), fc_bias: (H,) or None, proj_weight: (N, H), proj_bias:
    (N,) or None, each in any of those dtypes. fc_compute_weight /
    proj_compute_weight: None, or that weight already in x's dtype (read instead
    of converting it once per call; it must hold the weight's values rounded to
    x's dtype). accumulate_grad: add each parameter's gradient into its existing
    `.grad` inside the dW matmuls instead of returning it to autograd (see
    gpt2_kernels/linear.py). All on one CUDA device (CPU only under
    TRITON_INTERPRET=1).

    Returns (..., N) in x's dtype. The forward keeps the pre-activation and the
    hidden activation (each (M, H) in x's dtype) for the backward; without
    gradients neither is kept. Gradients come in their inputs' dtypes. The
    backward is once-differentiable: a gradient through it taken with
    create_graph=True (double backward) raises (PyTorch's ops allow it).
    """
    op = "mlp"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_dim=1, layout="(..., C)")
    check_tensor(op, "fc_weight", fc_weight, dtypes=FLOAT_DTYPES, dim=2, layout="(H, C)")
    check_tensor(op, "fc_weight", fc_weight, shape=(None, x.shape[-1]), layout="(H, C) with x's C")
    hidden = fc_weight.shape[0]
    check_tensor(op, "fc_bias", fc_bias, dtypes=FLOAT_DTYPES, shape=(hidden,), layout="(H,)", optional=True)
    check_tensor(op, "proj_weight", proj_weight, dtypes=FLOAT_DTYPES, dim=2, layout="(N, H)")
    check_tensor(op, "proj_weight", proj_weight, shape=(None, hidden), layout="(N, H) with fc_weight's H")
    check_tensor(op, "proj_bias", proj_bias, dtypes=FLOAT_DTYPES, shape=(proj_weight.shape[0],),
                 layout="(N,)", optional=True)
    check_compute_weight(op, "fc_compute_weight", fc_compute_weight, fc_weight, x)
    check_compute_weight(op, "proj_compute_weight", proj_compute_weight, proj_weight, x)
    check_same_device(op, x=x, fc_weight=fc_weight, fc_bias=fc_bias, proj_weight=proj_weight,
                      proj_bias=proj_bias, fc_compute_weight=fc_compute_weight,
                      proj_compute_weight=proj_compute_weight)
    check_bool(op, "accumulate_grad", accumulate_grad)
    # The epilogues read the biases as flat memory.
    fc_bias, proj_bias = contiguous(fc_bias), contiguous(proj_bias)
    params = (fc_weight, fc_bias, proj_weight, proj_bias)
    with on_device(x):  # backward runs on autograd's thread for x's device
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
            return _Mlp.apply(x, *params, fc_compute_weight, proj_compute_weight, accumulate_grad)
        x2d = as_rows(x)
        y, _, _ = _forward(x2d, compute_copy(fc_weight, fc_compute_weight, x.dtype), fc_bias,
                           compute_copy(proj_weight, proj_compute_weight, x.dtype), proj_bias,
                           store_pre=False)
        return y.view(*x.shape[:-1], proj_weight.shape[0])
