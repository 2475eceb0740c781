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

from gpt2_kernels._common import (FLOAT_DTYPES, SMEM_BUDGET_BYTES, check_same_device,
                                  check_same_dtype, check_tensor, contiguous, interpreting,
                                  launch_autotuned, on_device, once_differentiable, pick)

# The tanh-GELU's constants.
_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_CUBIC = tl.constexpr(0.044715)
_GELU_CUBIC_SLOPE = tl.constexpr(3 * 0.044715)

# Epilogues of the matmul kernel.
_EPILOGUE_NONE = tl.constexpr(0)       # c = acc (+ bias)
_EPILOGUE_GELU = tl.constexpr(1)       # pre = acc + bias; c = gelu(pre); optionally store pre
_EPILOGUE_GELU_GRAD = tl.constexpr(2)  # c = aux * gelu'(acc + bias): the recompute backward

# Matmul tiles on a GPU, (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps):
# Hopper-oriented; the pruner drops those whose pipelined operands would not fit
# in shared memory for the operands' dtype.
_MATMUL_TILES_GPU = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 64, 4, 4),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 3, 4),
]
# Row tiles that share column tiles while those are still in L2.
_GROUP_M = 8
# The interpreter runs one small config: autotuning fails there, and small
# tiles keep interpreted tests fast.
_MATMUL_CONFIG_INTERPRETER = triton.Config(
    {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": _GROUP_M}, num_stages=1, num_warps=4)
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
def _gelu_tanh(z):
    # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh intrinsic needed, and it
    # saturates to exactly 0 / 1 for large |u| instead of overflowing.
    u = _SQRT_2_OVER_PI * (z + _GELU_CUBIC * z * z * z)
    return z / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _gelu_tanh_grad(z):
    u = _SQRT_2_OVER_PI * (z + _GELU_CUBIC * z * z * z)
    s = 1.0 / (1.0 + tl.exp(-2.0 * u))
    du = _SQRT_2_OVER_PI * (1.0 + _GELU_CUBIC_SLOPE * z * z)
    # d/dz [z * s(2u)] = s + z * 2 s (1 - s) du
    return s + 2.0 * z * s * (1.0 - s) * du


def _prune_matmul_configs(configs, named_args, **kwargs):
    # Tiles whose pipelined operand buffers cannot fit in shared memory would
    # only fail to launch after costing a compile; fp32 operands are twice as
    # large as fp16/bf16 ones.
    elem = named_args["a_ptr"].element_size()
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"]
            * elem * c.num_stages <= SMEM_BUDGET_BYTES]
    return kept or configs[-1:]


# Operand dtypes join the key automatically; the epilogue and precision change
# the best tile, so they join it too.
@triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": _GROUP_M},
                           num_stages=s, num_warps=w) for bm, bn, bk, s, w in _MATMUL_TILES_GPU],
    key=["M", "N", "K", "EPILOGUE", "STORE_AUX", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_matmul_configs})
@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_cm, stride_cn, stride_xm, stride_xn,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_AUX: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = epilogue(A[M, K] @ B[K, N]); any strides, any M, N, K.

    aux is an (M, N) tensor addressed with stride_xm/stride_xn: the stored
    pre-activation for _EPILOGUE_GELU (when STORE_AUX), the upstream gradient
    for _EPILOGUE_GELU_GRAD.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # int64 row/column indices: operands may exceed 2**31 elements.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if UPCAST:
            # Only under the interpreter, whose bf16 arithmetic is wrong while
            # bf16 -> fp32 conversion is exact.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE == _EPILOGUE_GELU:
        if STORE_AUX:
            aux_ptrs = aux_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn
            tl.store(aux_ptrs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
        acc = _gelu_tanh(acc)
    elif EPILOGUE == _EPILOGUE_GELU_GRAD:
        aux_ptrs = aux_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn
        g = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc = g * _gelu_tanh_grad(acc)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


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
             _gelu_tanh(z).to(y_ptr.dtype.element_ty), mask=mask)


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
        d = g * _gelu_tanh_grad(z)
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


def _input_precision(dtype: torch.dtype) -> str:
    # Under the interpreter fp32 must stay exact. On a GPU, fp32 follows
    # PyTorch's own switch (torch.set_float32_matmul_precision("high") /
    # allow_tf32), so fp32 results agree with F.linear under the same setting;
    # "ieee" fp32 runs on CUDA cores (slow, exact). 16-bit operands ignore the
    # setting; they get Triton's GPU default.
    if interpreting():
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _matmul(a, b, out_dtype, *, bias=None, epilogue=_EPILOGUE_NONE, aux=None, store_aux=False):
    """epilogue(a @ b) with a (M, K), b (K, N) of any strides; returns a new
    contiguous (M, N) tensor. For _EPILOGUE_GELU with store_aux, `aux` is filled
    with the pre-activation; for _EPILOGUE_GELU_GRAD, `aux` is the upstream gradient."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    aux_t = aux if aux is not None else c

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (a, b, c, bias if bias is not None else c, aux_t,
            M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1), aux_t.stride(0), aux_t.stride(1))
    meta = dict(EPILOGUE=epilogue.value, HAS_BIAS=bias is not None, STORE_AUX=store_aux,
                UPCAST=interpreting() and a.dtype == torch.bfloat16,
                INPUT_PRECISION=_input_precision(a.dtype))
    launch_autotuned(_matmul_kernel, grid, args, meta, interpreter_config=_MATMUL_CONFIG_INTERPRETER)
    return c


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
