"""Fused GELU linear layer: y = gelu_tanh(x @ W.T + b), the first half of GPT-2's MLP.

Forward is one Triton matmul whose epilogue adds the bias, applies tanh-GELU and
(by default) also stores the pre-activation for backward. Backward turns the
incoming gradient into the pre-activation's gradient (dpre = dy * gelu'(pre)) in
one elementwise pass that also writes per-row-block partial column sums for the
bias gradient, then runs the same Triton matmul twice: dx = dpre @ W and
dW = dpre.T @ x. db is the fp32 sum of those partials (no atomics, so the result
is bit-identical run to run).
"""
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels._common import (check_device as _check_device, interpreting as _interpreting,
                             on_device as _on_device)

# Epilogues of the generic matmul.
_EPI_NONE = 0       # c = acc (+ bias)
_EPI_GELU = 1       # pre = acc + bias; c = gelu(pre); optionally store pre
_EPI_GELU_GRAD = 2  # c = aux * gelu'(acc + bias): recompute-mode backward

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------

@triton.jit
def _gelu_tanh(z):
    # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh intrinsic needed, and it
    # saturates to exactly 0 / 1 for large |u| instead of overflowing.
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    return z / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _gelu_tanh_grad(z):
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    s = 1.0 / (1.0 + tl.exp(-2.0 * u))
    du = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    # d/dz [z * s(2u)] = s + z * 2 s (1 - s) du
    return s + 2.0 * z * s * (1.0 - s) * du


def _matmul_configs():
    if _interpreting():
        # The interpreter cannot autotune over several configs; one small tile
        # keeps interpreted tests fast.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8},
                              num_stages=1, num_warps=4)]
    shapes = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): Hopper-oriented.
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
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=s, num_warps=w) for bm, bn, bk, s, w in shapes]


def _prune_configs(configs, named_args, **kwargs):
    # Drop tiles whose pipelined operand buffers cannot fit in shared memory
    # (H100: 227 KB per block) instead of paying a failed compile each; fp32
    # operands are twice as large as fp16/bf16 ones.
    elem = named_args["a_ptr"].element_size()
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"]
            * elem * c.num_stages <= 200 * 1024]
    return kept or configs[-1:]


# Operand dtypes join the key automatically; the epilogue and precision change
# the best tile, so they join it too.
@triton.autotune(configs=_matmul_configs(),
                 key=["M", "N", "K", "EPILOGUE", "STORE_AUX", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_configs})
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
    pre-activation for _EPI_GELU (when STORE_AUX), the upstream gradient for
    _EPI_GELU_GRAD.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-tiles share B column-tiles while they are
    # still in L2.
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
    if EPILOGUE == 1:
        if STORE_AUX:
            aux_ptrs = aux_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn
            tl.store(aux_ptrs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
        acc = _gelu_tanh(acc)
    elif EPILOGUE == 2:
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


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

def _input_precision(dtype: torch.dtype) -> str:
    # Under the interpreter fp32 must stay exact. On a GPU, fp32 follows
    # PyTorch's own switch (torch.set_float32_matmul_precision("high") /
    # allow_tf32), so fp32 results agree with F.linear under the same setting;
    # "ieee" fp32 runs on CUDA cores (slow, exact). 16-bit operands ignore the
    # setting; they get Triton's GPU default.
    if _interpreting():
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _matmul(a, b, out_dtype, *, bias=None, epilogue=_EPI_NONE, aux=None, store_aux=False):
    """epilogue(a @ b) with a (M, K), b (K, N) of any strides; returns a new
    contiguous (M, N) tensor. For _EPI_GELU with store_aux, `aux` is filled with
    the pre-activation; for _EPI_GELU_GRAD, `aux` is the upstream gradient."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return c
    aux_t = aux if aux is not None else c
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _matmul_kernel[grid](
        a, b, c, bias if bias is not None else c, aux_t,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        c.stride(0), c.stride(1), aux_t.stride(0), aux_t.stride(1),
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, STORE_AUX=store_aux,
        UPCAST=_interpreting() and a.dtype == torch.bfloat16,
        INPUT_PRECISION=_input_precision(a.dtype),
    )
    return c


def _elementwise_blocks():
    # Fewer, larger tiles under the interpreter (its cost is per program);
    # 64x128 on a GPU keeps the db partial buffer small (M/64 rows).
    return (32, 64) if _interpreting() else (64, 128)


def _gelu_forward(pre):
    M, N = pre.shape
    y = torch.empty((M, N), device=pre.device, dtype=pre.dtype)
    if y.numel() == 0:
        return y
    bm, bn = _elementwise_blocks()
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
    bm, bn = _elementwise_blocks()
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
            br, bn = (8, 64) if _interpreting() else (32, 64)
            _column_sum_kernel[(triton.cdiv(N, bn),)](partial, db, rows, N, BLOCK_R=br, BLOCK_N=bn)
    return dpre, db


@dataclass(frozen=True)
class MatmulBackends:
    """Which library runs each of the three matmuls of `linear_gelu`.

    "triton" (default) runs our kernel with its fused epilogue; "torch" runs
    torch.matmul (cuBLAS on a GPU) for that piece, with the GELU / GELU-grad
    done by a separate Triton elementwise pass. Meant for measuring each piece
    against cuBLAS on the GPU and keeping whichever is faster.

    forward: pre = x @ W.T + b (and its recompute in backward when recompute=True).
    dx:      dx = dpre @ W.
    dw:      dW = dpre.T @ x.
    """

    forward: str = "triton"
    dx: str = "triton"
    dw: str = "triton"

    def __post_init__(self):
        for name in ("forward", "dx", "dw"):
            value = getattr(self, name)
            if value not in ("triton", "torch"):
                raise ValueError(f"MatmulBackends: {name} is {value!r}; expected 'triton' or 'torch'")


def _linear(x2d, weight, bias, backend):
    """pre = x2d @ W.T + b (no activation), for the cuBLAS path and recompute."""
    if backend == "torch":
        pre = x2d @ weight.t()
        return pre + bias if bias is not None else pre
    return _matmul(x2d, weight.t(), x2d.dtype, bias=bias)


def _forward(x2d, weight, bias, store_pre, backend):
    """Returns (y, pre or None)."""
    if backend == "torch":
        pre = _linear(x2d, weight, bias, "torch")
        return _gelu_forward(pre), (pre if store_pre else None)
    M, N = x2d.shape[0], weight.shape[0]
    pre = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype) if store_pre else None
    y = _matmul(x2d, weight.t(), x2d.dtype, bias=bias, epilogue=_EPI_GELU,
                aux=pre, store_aux=store_pre)
    return y, pre


# ---------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------

class _LinearGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, recompute, backends):
        need_dw = ctx.needs_input_grad[1]
        y, pre = _forward(x2d, weight, bias, store_pre=not recompute,
                          backend=backends.forward)
        ctx.recompute = recompute
        ctx.backends = backends
        # x is needed only for dW and for recomputing pre; dropping it otherwise
        # lets the caller free it.
        keep_x = need_dw or recompute
        ctx.save_for_backward(x2d if keep_x else None, weight, bias, pre)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, bias, pre = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = need_db and bias is not None
        dx = dw = db = None
        if not (need_dx or need_dw or need_db):
            return dx, dw, db, None, None
        backends = ctx.backends
        if ctx.recompute:
            if backends.forward == "triton":
                # One matmul recomputes pre and turns dy into dpre in its
                # epilogue: pre is never written to memory.
                dpre = _matmul(x2d, weight.t(), x2d.dtype, bias=bias,
                               epilogue=_EPI_GELU_GRAD, aux=dy)
                dpre, db = _gelu_backward(None, None, dpre, need_db, weight.dtype)
            else:
                pre = _linear(x2d, weight, bias, "torch")
                dpre, db = _gelu_backward(dy, pre, None, need_db, weight.dtype)
        else:
            dpre, db = _gelu_backward(dy, pre, None, need_db, weight.dtype)
        if need_dx:
            dx = (dpre @ weight if backends.dx == "torch"
                  else _matmul(dpre, weight, weight.dtype))
        if need_dw:
            dw = (dpre.t() @ x2d if backends.dw == "torch"
                  else _matmul(dpre.t(), x2d, weight.dtype))
        return dx, dw, db, None, None


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------

def _check(x, weight, bias):
    name = "linear_gelu"
    for arg, t in (("x", x), ("weight", weight), ("bias", bias)):
        if arg == "bias" and t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name}: {arg} has dtype {t.dtype}; supported: "
                            "torch.float32, torch.float16, torch.bfloat16")
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: {arg} has dtype {t.dtype} but x has {x.dtype}; "
                            "all inputs must share one dtype")
    for arg, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but x is on {x.device}; "
                             "all inputs must be on one device")
        _check_device(name, arg, t.device)
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least 1 dimension (..., in_features); "
                         "got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D (out_features, in_features); "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{name}: weight has in_features {weight.shape[1]} but x has "
                         f"last dim {x.shape[-1]}; weight must be (out_features, in_features)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias has shape {tuple(bias.shape)}; expected "
                         f"({weight.shape[0]},) = (out_features,)")


def linear_gelu(x, weight, bias=None, *, recompute=False, backends=None):
    """y = gelu_tanh(x @ weight.T + bias), fused in one Triton matmul.

    Equals ``F.gelu(F.linear(x, weight, bias), approximate="tanh")``.

    Args:
        x: (..., K) tensor, float32/float16/bfloat16, any strides (viewed as
           (M, K) with M = prod(leading dims); a copy only when the leading
           dims cannot be flattened without one).
        weight: (N, K) in nn.Linear layout (out_features, in_features), x's dtype.
        bias: (N,) or None, x's dtype.
        recompute: False (default) stores the pre-activation x @ W.T + b, one
           (M, N) tensor in x's dtype (for GPT-2 with N = 4K that is 4x the size
           of x), from the forward epilogue. True stores nothing extra and
           recomputes the pre-activation in backward: one more matmul
           (M*N*K*2 FLOPs, +50% of forward) for M*N elements less memory.
        backends: a `MatmulBackends` choosing Triton (default) or torch.matmul
           for each of the three matmuls.

    Returns:
        (..., N) tensor in x's dtype, contiguous. Empty leading dims give an
        empty result.

    Precision: fp32 accumulation throughout; bias gradient summed in fp32. On a
    GPU, fp32 inputs use TF32 tensor cores exactly when PyTorch's matmuls would
    (``torch.backends.cuda.matmul.allow_tf32``, set by
    ``torch.set_float32_matmul_precision("high")``); otherwise full fp32.
    """
    _check(x, weight, bias)
    if backends is None:
        backends = MatmulBackends()
    elif not isinstance(backends, MatmulBackends):
        raise TypeError(f"linear_gelu: backends must be a MatmulBackends; got {type(backends).__name__}")
    K = x.shape[-1]
    N = weight.shape[0]
    lead = x.shape[:-1]
    # Explicit M: reshape(-1, K) is ambiguous when K == 0.
    x2d = x.reshape(math.prod(lead), K)
    if bias is not None:
        bias = bias.contiguous()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    with _on_device(x):  # backward runs on autograd's thread for x's device
        if needs_grad:
            y2d = _LinearGelu.apply(x2d, weight, bias, bool(recompute), backends)
        else:
            # Inference: skip autograd and do not store the pre-activation.
            y2d, _ = _forward(x2d, weight, bias, store_pre=False, backend=backends.forward)
    return y2d.reshape(*lead, N)
