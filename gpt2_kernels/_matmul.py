"""The one Triton matmul the linear ops share (not part of the public API), with
the epilogues that keep their elementwise work inside it.

    C[M, N] = epilogue(A[M, K] @ B[K, N] (+ bias)),  A and B of any strides, fp32 accumulation

Epilogues (constexpr; each compiles only what it uses):
- NONE: c = acc (+ bias).
- GELU: pre = acc + bias, stored to `aux` when asked; c = gelu_tanh(pre).
- GELU_GRAD: c = aux * gelu_tanh'(acc + bias) -- the recompute backward, where
  acc + bias recomputes the pre-activation and aux is the upstream gradient.
- TIMES_GELU_GRAD: c = acc * gelu_tanh'(aux) -- the MLP's backward, where acc
  is the upstream gradient dy @ W and aux the saved pre-activation.
- LSE: c as NONE, and for each row the (max, sum of exp(c - max)) of the tile's
  columns below `n_valid_cols`, from the values as stored (rounded to c's dtype),
  into (M, cdiv(N, BLOCK_N)) fp32 buffers: the pieces of the row's log-sum-exp,
  so a cross-entropy reads its logits once (gpt2_kernels/linear_cross_entropy.py).

Two more switches, for weight gradients:
- accumulate: c = acc + c (beta = 1): the result is added to what c holds, in
  fp32, rounded once to c's dtype -- a gradient accumulated across micro-steps
  without a separate add.
- row sums: the programs of the first column of tiles also sum A's rows over
  K (the whole K, in the main loop) into `row_sum` (optionally added to it):
  for dW = dy.T @ x, A = dy.T and the row sums are the bias gradient.

Tiles come from an autotuner keyed on the shapes and the switches; an in-place
variant restores its outputs between trial runs. The LSE epilogue has its own
autotuner whose tiles all have BLOCK_N = LSE_BLOCK_N, so the launcher knows how
many partial columns to allocate.
"""
import math

import torch
import triton
import triton.language as tl

from gpt2_kernels._common import SMEM_BUDGET_BYTES, interpreting, launch_autotuned, pick

# The tanh-GELU's constants.
_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_CUBIC = tl.constexpr(0.044715)
_GELU_CUBIC_SLOPE = tl.constexpr(3 * 0.044715)

EPILOGUE_NONE = tl.constexpr(0)
EPILOGUE_GELU = tl.constexpr(1)
EPILOGUE_GELU_GRAD = tl.constexpr(2)
EPILOGUE_TIMES_GELU_GRAD = tl.constexpr(3)
EPILOGUE_LSE = tl.constexpr(4)

# Matmul tiles on a GPU, (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps):
# Hopper-oriented; the pruner drops those whose pipelined operands would not fit
# in shared memory for the operands' dtype.
_TILES_GPU = [
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
# The LSE epilogue's tiles: one column width, so the partial buffers' width is
# known before the autotuner picks.
LSE_BLOCK_N_GPU = 128
_LSE_TILES_GPU = [
    (128, LSE_BLOCK_N_GPU, 64, 4, 8),
    (128, LSE_BLOCK_N_GPU, 64, 3, 4),
    (256, LSE_BLOCK_N_GPU, 64, 3, 8),
    (64, LSE_BLOCK_N_GPU, 64, 4, 4),
]
# Row tiles that share column tiles while those are still in L2.
_GROUP_M = 8
# The interpreter runs one small config: autotuning fails there, and small
# tiles keep interpreted tests fast.
_INTERPRETER_TILE = 32
_CONFIG_INTERPRETER = triton.Config(
    {"BLOCK_M": _INTERPRETER_TILE, "BLOCK_N": _INTERPRETER_TILE, "BLOCK_K": _INTERPRETER_TILE,
     "GROUP_M": _GROUP_M}, num_stages=1, num_warps=4)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def gelu_tanh(z):
    # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh intrinsic needed, and it
    # saturates to exactly 0 / 1 for large |u| instead of overflowing.
    u = _SQRT_2_OVER_PI * (z + _GELU_CUBIC * z * z * z)
    return z / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def gelu_tanh_grad(z):
    u = _SQRT_2_OVER_PI * (z + _GELU_CUBIC * z * z * z)
    s = 1.0 / (1.0 + tl.exp(-2.0 * u))
    du = _SQRT_2_OVER_PI * (1.0 + _GELU_CUBIC_SLOPE * z * z)
    # d/dz [z * s(2u)] = s + z * 2 s (1 - s) du
    return s + 2.0 * z * s * (1.0 - s) * du


def _prune_configs(configs, named_args, **kwargs):
    # Tiles whose pipelined operand buffers cannot fit in shared memory would
    # only fail to launch after costing a compile; fp32 operands are twice as
    # large as fp16/bf16 ones.
    elem = named_args["a_ptr"].element_size()
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"]
            * elem * c.num_stages <= SMEM_BUDGET_BYTES]
    return kept or configs[-1:]


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, aux_ptr, rs_ptr, lse_max_ptr, lse_sum_ptr,
    M, N, K, n_valid_cols,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_cm, stride_cn, stride_xm, stride_xn, stride_lm,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_AUX: tl.constexpr,
    ACCUMULATE: tl.constexpr, ROW_SUM: tl.constexpr, ROW_SUM_ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = epilogue(A[M, K] @ B[K, N]); any strides, any M, N, K.

    aux is an (M, N) tensor addressed with stride_xm/stride_xn (see the module
    docstring for what each epilogue reads or writes there); the LSE pieces are
    (M, cdiv(N, BLOCK_N)) with row stride stride_lm.
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
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if UPCAST:
            # Only under the interpreter, whose bf16 arithmetic is wrong while
            # bf16 -> fp32 conversion is exact.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ROW_SUM:
            if pid_n == 0:
                row_sum += tl.sum(a.to(tl.float32), axis=1)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE == EPILOGUE_GELU:
        if STORE_AUX:
            aux_ptrs = aux_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn
            tl.store(aux_ptrs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
        acc = gelu_tanh(acc)
    elif EPILOGUE == EPILOGUE_GELU_GRAD:
        aux_ptrs = aux_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn
        g = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc = g * gelu_tanh_grad(acc)
    elif EPILOGUE == EPILOGUE_TIMES_GELU_GRAD:
        aux_ptrs = aux_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn
        z = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc = acc * gelu_tanh_grad(z)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptrs, c, mask=mask)
    if EPILOGUE == EPILOGUE_LSE:
        # The pieces of each row's log-sum-exp over the real columns, from the
        # logits as stored: the softmax a reader of c computes is consistent.
        z = tl.where(offs_n[None, :] < n_valid_cols, c.to(tl.float32), float("-inf"))
        z_max = tl.max(z, axis=1)
        # A tile with no real column (all padding) has max -inf and sum 0.
        shift = tl.where(z_max == float("-inf"), 0.0, z_max)
        z_sum = tl.sum(tl.exp(z - shift[:, None]), axis=1)
        lse_offs = offs_m * stride_lm + pid_n
        tl.store(lse_max_ptr + lse_offs, z_max, mask=mask_m)
        tl.store(lse_sum_ptr + lse_offs, z_sum, mask=mask_m)
    if ROW_SUM:
        if pid_n == 0:
            if ROW_SUM_ACCUMULATE:
                row_sum += tl.load(rs_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
            tl.store(rs_ptr + offs_m, row_sum.to(rs_ptr.dtype.element_ty), mask=mask_m)


# Operand dtypes join the key automatically; the epilogue, the switches and the
# precision change the best tile, so they join it too. Trial runs of a variant
# that adds into its outputs must not see each other's sums.
_KEY = ["M", "N", "K", "EPILOGUE", "STORE_AUX", "ACCUMULATE", "ROW_SUM", "INPUT_PRECISION"]
_matmul_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": _GROUP_M},
                           num_stages=s, num_warps=w) for bm, bn, bk, s, w in _TILES_GPU],
    key=_KEY, restore_value=["c_ptr", "rs_ptr"],
    prune_configs_by={"early_config_prune": _prune_configs})(_matmul_kernel)
_matmul_lse_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": _GROUP_M},
                           num_stages=s, num_warps=w) for bm, bn, bk, s, w in _LSE_TILES_GPU],
    key=_KEY, prune_configs_by={"early_config_prune": _prune_configs})(_matmul_kernel)


# ----------------------------------------------------------------------------- launcher


def input_precision(dtype: torch.dtype) -> str:
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


def lse_block_n() -> int:
    """The LSE epilogue's tile width: its partial buffers have cdiv(N, this) columns."""
    return pick(gpu=LSE_BLOCK_N_GPU, interpreter=_INTERPRETER_TILE)


def matmul(a, b, out_dtype=None, *, bias=None, epilogue=EPILOGUE_NONE, aux=None, store_aux=False,
           out=None, accumulate=False, row_sum=None, row_sum_accumulate=False, lse=None,
           n_valid_cols=None):
    """epilogue(a @ b (+ bias)) with a (M, K), b (K, N) of any strides.

    Writes into `out` (any strides; with `accumulate`, adds to what it holds) or
    a new contiguous (M, N) tensor in out_dtype, and returns it. For
    EPILOGUE_GELU with store_aux, `aux` is filled with the pre-activation; for
    the GELU_GRAD epilogues, `aux` is read. row_sum: an (M,) tensor that
    receives (or, with row_sum_accumulate, adds) the row sums of `a`. lse: a
    pair of (M, cdiv(N, lse_block_n())) fp32 tensors for EPILOGUE_LSE, over the
    columns below n_valid_cols."""
    M, K = a.shape
    N = b.shape[1]
    c = out if out is not None else torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0:
        return c
    if N == 0:
        # No tile to run, so no program sums rows: the (rare) row sums directly.
        if row_sum is not None:
            sums = a.float().sum(1)
            row_sum.copy_(row_sum.float() + sums if row_sum_accumulate else sums)
        return c
    aux_t = aux if aux is not None else c
    lse_max, lse_sum = lse if lse is not None else (c, c)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (a, b, c, bias if bias is not None else c, aux_t,
            row_sum if row_sum is not None else c, lse_max, lse_sum,
            M, N, K, N if n_valid_cols is None else n_valid_cols,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1), aux_t.stride(0), aux_t.stride(1),
            lse_max.stride(0) if lse is not None else 0)
    meta = dict(EPILOGUE=epilogue.value, HAS_BIAS=bias is not None, STORE_AUX=store_aux,
                ACCUMULATE=accumulate, ROW_SUM=row_sum is not None,
                ROW_SUM_ACCUMULATE=row_sum is not None and row_sum_accumulate,
                UPCAST=interpreting() and a.dtype == torch.bfloat16,
                INPUT_PRECISION=input_precision(a.dtype))
    tuned = _matmul_lse_tuned if epilogue.value == EPILOGUE_LSE.value else _matmul_tuned
    launch_autotuned(tuned, grid, args, meta, interpreter_config=_CONFIG_INTERPRETER)
    return c
