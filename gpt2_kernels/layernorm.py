"""LayerNorm over the last dimension, and the residual add + LayerNorm of a pre-norm
transformer block fused into one pass, with their backward passes.

Math, per row of C features (statistics and accumulation in fp32):

    h    = residual + dropout(x)        (add_layer_norm; rounded to residual's dtype)
    mean = sum(h) / C
    rstd = 1 / sqrt(sum((h - mean)^2) / C + eps)
    xhat = (h - mean) * rstd
    y    = xhat * weight + bias

    dropout(x) = x * keep / (1 - p),  keep = [u >= p],  u = Philox uniform(seed, element index)

    backward, with g = weight * dy:
    dh_in     = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh
    dresidual = dh_in,  dx = dh_in * keep / (1 - p)
    dweight   = sum over rows of dy * xhat,  dbias = sum over rows of dy

Dropout's mask is never stored: the backward draws the same Philox numbers
again from the seed (a one-element int64 device tensor, read inside the kernels,
so a CUDA graph replays with whatever seed the tensor holds) and the element's
index row * C + col. With p = 0 the kernels are compiled without any of it.

Each tensor keeps its own dtype and is converted in registers: a bf16 branch
output x and an fp32 residual stream are read as they are, h is written in the
residual's dtype, y in `out_dtype`, and each gradient in its input's dtype
(fp32 master weights get fp32 gradients). No cast or copy pass runs outside the
kernels.

Forward: one program per row; the whole row lives in registers (BLOCK_N is the
next power of two of C, masked), so the row is read once and the variance comes
from the centred row (no E[h^2] - E[h]^2 cancellation). mean and rstd, shape
(rows,), fp32, are saved for the backward.

Backward: each program owns a contiguous group of rows; it writes the input
gradient row by row and accumulates dweight/dbias for its group in fp32
registers, stored to a (programs, C) fp32 buffer that a second small kernel sums
over programs in a fixed order: deterministic, no atomics.
"""
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpt2_kernels._common import (FLOAT_DTYPES, check_bool, check_dropout_p, check_dtype, check_real,
                                  check_same_device, check_tensor, contiguous, dropout_seed,
                                  grad_buffer, on_device, once_differentiable, pick, round_to)

# A row lives in one program's registers; this many bytes of it at most
# (16384 fp32 or 32768 fp16/bf16 features).
_MAX_ROW_BYTES = 65536
# Narrower blocks give degenerate 1- or 2-element layouts; masking makes the
# extra lanes inert.
_MIN_BLOCK_N = 16
# As in Triton's tutorial 05: one warp per 256 columns (8 per thread), at most 16.
_COLS_PER_WARP = 256
_MAX_WARPS = 16
# Backward programs: several per SM hide the latency of each row's loads; more
# would grow the (programs, C) partial buffers the reduction reads. The
# interpreter runs programs one by one: a few, with several rows each, still
# crosses the group boundaries.
_BWD_PROGRAMS_PER_SM = 4
_INTERPRETER_BWD_PROGRAMS = 8
# The partial-sum reduction's tile (programs x columns) on a GPU.
_REDUCE_TILE_GPU = (64, 32)
_REDUCE_NUM_WARPS = 4


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _dropout_keep(seed, row, cols, N_COLS, p):
    """Whether dropout keeps element (row, cols) (row int64): a Philox uniform
    keyed by the seed and the element's index, at least p."""
    return tl.rand(seed, row * N_COLS + cols) >= p


@triton.jit
def _ln_fwd_kernel(
    X, R, H, Y, W, B, Mean, Rstd, SEED,
    stride_x_row, stride_r_row, stride_h_row, stride_y_row,
    N_COLS, eps, dropout_p, dropout_scale,
    HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # int64 before multiplying by strides: rows * stride can pass 2**31.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N_COLS
    h = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = _dropout_keep(tl.load(SEED), row, cols, N_COLS, dropout_p)
        h = tl.where(keep, h * dropout_scale, 0.0)
    if HAS_RESIDUAL:
        h += tl.load(R + row * stride_r_row + cols, mask=mask, other=0.0).to(tl.float32)
    if STORE_H:
        h_out = round_to(h, H.dtype.element_ty)
        tl.store(H + row * stride_h_row + cols, h_out, mask=mask)
        # Normalise the rounded h: what F.layer_norm(residual + x) sees, and what
        # the backward re-reads.
        h = h_out.to(tl.float32)
    mean = tl.sum(h, axis=0) / N_COLS
    hc = tl.where(mask, h - mean, 0.0)
    var = tl.sum(hc * hc, axis=0) / N_COLS
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = hc * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y_row + cols, round_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_kernel(
    H, W, DY, DH, DX, DR, Mean, Rstd, DW_PART, DB_PART, SEED,
    stride_h_row, stride_dy_row, stride_dh_row, stride_dx_row, stride_dr_row,
    N_ROWS, N_COLS, rows_per_program, dropout_p, dropout_scale,
    HAS_DY: tl.constexpr, HAS_DH: tl.constexpr, STORE_DX: tl.constexpr, STORE_DR: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The input gradient dh_in = dLN(dy) + dh of each row, stored to DR (the
    residual's gradient, in its dtype) and, through the dropout mask drawn again,
    to DX (x's gradient, in x's dtype; without dropout and with one dtype DX
    alone serves both), plus this program's partial column sums for dweight and dbias."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N_COLS
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N_ROWS)
    # Advance 64-bit pointers row by row: row * stride can pass 2**31 elements.
    start64 = row_start.to(tl.int64)
    H += start64 * stride_h_row
    DY += start64 * stride_dy_row
    DH += start64 * stride_dh_row
    DX += start64 * stride_dx_row
    DR += start64 * stride_dr_row
    row64 = start64  # the row's index in int64, for the dropout counter
    for row in range(row_start, row_end):
        d_in = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if HAS_DY:
            h = tl.load(H + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            xhat = tl.where(mask, (h - mean) * rstd, 0.0)
            if COMPUTE_DW:
                dw += dy * xhat
            if COMPUTE_DB:
                db += dy
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / N_COLS
            c2 = tl.sum(wdy, axis=0) / N_COLS
            d_in = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DH:
            d_in += tl.load(DH + cols, mask=mask, other=0.0).to(tl.float32)
        if STORE_DR:
            tl.store(DR + cols, round_to(d_in, DR.dtype.element_ty), mask=mask)
        if STORE_DX:
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, row64, cols, N_COLS, dropout_p)
                d_in = tl.where(keep, d_in * dropout_scale, 0.0)
            tl.store(DX + cols, round_to(d_in, DX.dtype.element_ty), mask=mask)
        H += stride_h_row
        DY += stride_dy_row
        DH += stride_dh_row
        DX += stride_dx_row
        DR += stride_dr_row
        row64 += 1
    # Partial buffers are tiny ((programs, C) fp32): pid * N_COLS fits int32.
    if COMPUTE_DW:
        tl.store(DW_PART + pid * N_COLS + cols, dw, mask=mask)
    if COMPUTE_DB:
        tl.store(DB_PART + pid * N_COLS + cols, db, mask=mask)


@triton.jit
def _ln_bwd_reduce_kernel(
    DW_PART, DB_PART, DW, DB,
    N_PARTS, N_COLS,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ACCUMULATE_DW: tl.constexpr, ACCUMULATE_DB: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dweight and dbias: the partial sums over programs, in a fixed order,
    written (or, ACCUMULATE_*, added to what DW / DB hold) once."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < N_COLS
    parts = tl.arange(0, BLOCK_P)
    acc_w = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # Fixed summation order for every run: results are bit-reproducible.
    for p0 in range(0, N_PARTS, BLOCK_P):
        p = p0 + parts
        offs = p[:, None] * N_COLS + cols[None, :]
        m = (p[:, None] < N_PARTS) & col_mask[None, :]
        if COMPUTE_DW:
            acc_w += tl.load(DW_PART + offs, mask=m, other=0.0)
        if COMPUTE_DB:
            acc_b += tl.load(DB_PART + offs, mask=m, other=0.0)
    if COMPUTE_DW:
        dw = tl.sum(acc_w, axis=0)
        if ACCUMULATE_DW:
            dw += tl.load(DW + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=col_mask)
    if COMPUTE_DB:
        db = tl.sum(acc_b, axis=0)
        if ACCUMULATE_DB:
            db += tl.load(DB + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=col_mask)


@triton.jit
def _dropout_mask_kernel(SEED, KEEP, N_COLS, dropout_p, BLOCK_N: tl.constexpr):
    """The dropout mask the kernels above draw, written out (for tests only)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(SEED), row, cols, N_COLS, dropout_p)
    tl.store(KEEP + row * N_COLS + cols, keep.to(tl.int8), mask=cols < N_COLS)


# ----------------------------------------------------------------------------- launchers


def _block_n(n_cols: int) -> int:
    return max(triton.next_power_of_2(n_cols), _MIN_BLOCK_N)


def _num_warps(block_n: int) -> int:
    return min(max(block_n // _COLS_PER_WARP, 1), _MAX_WARPS)


def _rows2d(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., C) -> (rows, C) with unit column stride, as a view when possible so
    a row stride (e.g. a slice of a wider tensor) is handled without a copy."""
    t2 = t.reshape(-1, n_cols)
    if t2.stride(-1) != 1 and n_cols > 1:
        t2 = t2.contiguous()
    return t2


@dataclass(frozen=True)
class _Dropout:
    """Dropout of x before the add: probability p, Philox seed in a device tensor."""

    p: float
    seed: torch.Tensor

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p)


def _dropout_kernel_args(dropout):
    """(seed pointer, p, scale) as the kernels take them; inert without dropout."""
    if dropout is None:
        return None, 0.0, 1.0
    return dropout.seed, dropout.p, dropout.scale


def _dropout_mask(seed: torch.Tensor, shape, p: float) -> torch.Tensor:
    """The keep mask (bool, `shape`, rows of shape[-1]) that add_layer_norm draws
    with this seed and p: what its kernels regenerate, materialised for tests."""
    n_cols = shape[-1]
    n_rows = math.prod(shape[:-1])
    keep = torch.empty((n_rows, n_cols), dtype=torch.int8, device=seed.device)
    if keep.numel():
        with on_device(seed):
            _dropout_mask_kernel[(n_rows,)](seed, keep, n_cols, p, BLOCK_N=_block_n(n_cols))
    return keep.view(shape).bool()


@dataclass(frozen=True)
class _Forward:
    """What the forward launcher returns: the rows that were normalised (h2, or
    x2 when nothing was added), y2, and the statistics the backward needs."""

    normalised: torch.Tensor
    y: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor


def _ln_forward(x2, residual2, weight, bias, eps, out_dtype, dropout=None) -> _Forward:
    """x2, residual2 (or None): (rows, C), unit column stride. h = residual2 +
    dropout(x2) is written in residual2's dtype (x2's without a residual); with
    neither a residual nor dropout h is x2 itself, not written. y2 in out_dtype."""
    n_rows, n_cols = x2.shape
    device = x2.device
    y2 = torch.empty((n_rows, n_cols), dtype=out_dtype, device=device)
    h_dtype = residual2.dtype if residual2 is not None else x2.dtype
    store_h = residual2 is not None or dropout is not None
    h2 = torch.empty((n_rows, n_cols), dtype=h_dtype, device=device) if store_h else None
    mean = torch.empty((n_rows,), dtype=torch.float32, device=device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=device)
    normalised = h2 if h2 is not None else x2
    if n_rows == 0:
        return _Forward(normalised, y2, mean, rstd)
    block_n = _block_n(n_cols)
    r_arg = residual2 if residual2 is not None else x2  # never read without a residual
    h_arg = h2 if h2 is not None else y2  # never written unless stored
    seed, p, scale = _dropout_kernel_args(dropout)
    with on_device(x2):
        _ln_fwd_kernel[(n_rows,)](
            x2, r_arg, h_arg, y2, weight, bias if bias is not None else weight, mean, rstd,
            seed if seed is not None else mean,
            x2.stride(0), r_arg.stride(0), h_arg.stride(0), y2.stride(0),
            n_cols, eps, p, scale,
            HAS_RESIDUAL=residual2 is not None, STORE_H=store_h,
            HAS_BIAS=bias is not None, HAS_DROPOUT=dropout is not None,
            BLOCK_N=block_n, num_warps=_num_warps(block_n),
        )
    return _Forward(normalised, y2, mean, rstd)


def _bwd_num_programs(device: torch.device, n_rows: int) -> int:
    target = pick(gpu=lambda: _BWD_PROGRAMS_PER_SM
                  * torch.cuda.get_device_properties(device).multi_processor_count,
                  interpreter=lambda: _INTERPRETER_BWD_PROGRAMS)()
    return max(1, min(n_rows, target))


def _ln_backward(dy2, dh2, saved: _Forward, weight, bias_dtype, *,
                 dx_dtype, dr_dtype, compute_dw, compute_db, dropout=None, dw_into=None, db_into=None):
    """dy2 (or None), dh2 (or None): (rows, C), unit column stride.

    Returns (dx2 in dx_dtype, dr2 in dr_dtype, dweight, dbias); a dtype None
    means that gradient is not wanted. Without dropout and where dx_dtype ==
    dr_dtype the two are one tensor, written once. dw_into / db_into: tensors
    (the parameters' .grad) that dweight / dbias are added to instead; those
    are then returned as None."""
    h2, mean, rstd = saved.normalised, saved.mean, saved.rstd
    n_rows, n_cols = h2.shape
    device = h2.device
    compute_dw = compute_dw and dy2 is not None
    compute_db = compute_db and dy2 is not None and bias_dtype is not None
    shared = dropout is None and dr_dtype == dx_dtype
    if shared:
        dr_dtype = None  # dr2 is dx2
    dx2 = torch.empty((n_rows, n_cols), dtype=dx_dtype, device=device) if dx_dtype else None
    dr2 = torch.empty((n_rows, n_cols), dtype=dr_dtype, device=device) if dr_dtype else None
    dw_into = dw_into if compute_dw else None
    db_into = db_into if compute_db else None
    dw = dw_into if dw_into is not None else torch.empty_like(weight) if compute_dw else None
    db = (db_into if db_into is not None
          else torch.empty((n_cols,), dtype=bias_dtype, device=device) if compute_db else None)

    def handed_over(into, grad):
        return None if into is not None else grad

    if n_rows == 0:
        # Sums over zero rows are zero (and add nothing).
        if compute_dw and dw_into is None:
            dw.zero_()
        if compute_db and db_into is None:
            db.zero_()
        return dx2, dx2 if shared else dr2, handed_over(dw_into, dw), handed_over(db_into, db)
    block_n = _block_n(n_cols)
    n_programs = _bwd_num_programs(device, n_rows)
    rows_per_program = triton.cdiv(n_rows, n_programs)
    n_programs = triton.cdiv(n_rows, rows_per_program)  # no program without rows
    dw_part = (torch.empty((n_programs, n_cols), dtype=torch.float32, device=device)
               if compute_dw else None)
    db_part = (torch.empty((n_programs, n_cols), dtype=torch.float32, device=device)
               if compute_db else None)
    dummy = mean  # never dereferenced where its flag is off

    def arg(t):
        return t if t is not None else dummy

    def row_stride(t):
        return t.stride(0) if t is not None else 0

    seed, p, scale = _dropout_kernel_args(dropout)
    with on_device(h2):
        _ln_bwd_kernel[(n_programs,)](
            h2, weight, arg(dy2), arg(dh2), arg(dx2), arg(dr2), mean, rstd,
            arg(dw_part), arg(db_part), arg(seed),
            h2.stride(0), row_stride(dy2), row_stride(dh2), row_stride(dx2), row_stride(dr2),
            n_rows, n_cols, rows_per_program, p, scale,
            HAS_DY=dy2 is not None, HAS_DH=dh2 is not None,
            STORE_DX=dx2 is not None, STORE_DR=dr2 is not None,
            COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, HAS_DROPOUT=dropout is not None,
            BLOCK_N=block_n, num_warps=_num_warps(block_n),
        )
        if compute_dw or compute_db:
            block_p, block_c = pick(gpu=_REDUCE_TILE_GPU,
                                    interpreter=(triton.next_power_of_2(n_programs), block_n))
            _ln_bwd_reduce_kernel[(triton.cdiv(n_cols, block_c),)](
                arg(dw_part), arg(db_part), arg(dw), arg(db),
                n_programs, n_cols,
                COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
                ACCUMULATE_DW=dw_into is not None, ACCUMULATE_DB=db_into is not None,
                BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_REDUCE_NUM_WARPS,
            )
    return dx2, dx2 if shared else dr2, handed_over(dw_into, dw), handed_over(db_into, db)


# ----------------------------------------------------------------------------- autograd


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        n_cols = x.shape[-1]
        saved = _ln_forward(_rows2d(x, n_cols), None, weight, bias, eps, out_dtype)
        ctx.save_for_backward(saved.normalised, weight, saved.mean, saved.rstd)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_shape = x.shape
        return saved.y.view(x.shape)

    @staticmethod
    @once_differentiable("layer_norm")
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx2, _, dw, db = _ln_backward(
            _rows2d(dy, x2.shape[1]), None, _Forward(x2, None, mean, rstd), weight, ctx.bias_dtype,
            dx_dtype=x2.dtype if need_dx else None, dr_dtype=None,
            compute_dw=need_dw, compute_db=need_db)
        return (dx2.view(ctx.x_shape) if dx2 is not None else None), dw, db, None, None


class _AddLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, out_dtype, dropout_p, seed, accumulate_grad):
        n_cols = x.shape[-1]
        dropout = _Dropout(dropout_p, seed) if dropout_p > 0 else None
        saved = _ln_forward(_rows2d(x, n_cols),
                            _rows2d(residual, n_cols) if residual is not None else None,
                            weight, bias, eps, out_dtype, dropout)
        # The seed is saved, not copied: changing it in place before the backward
        # is then autograd's clear error, not a wrong mask.
        ctx.save_for_backward(saved.normalised, weight, saved.mean, saved.rstd,
                              seed if dropout is not None else None,
                              bias if accumulate_grad else None)
        ctx.dropout_p = dropout_p
        ctx.accumulate_grad = accumulate_grad
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        # An unused output's gradient arrives as None, not as zeros to read.
        ctx.set_materialize_grads(False)
        return saved.normalised.view(x.shape), saved.y.view(x.shape)

    @staticmethod
    @once_differentiable("add_layer_norm")
    def backward(ctx, dh, dy):
        h2, weight, mean, rstd, seed, bias = ctx.saved_tensors
        need_dx, need_dr, need_dw, need_db = ctx.needs_input_grad[:4]
        n_cols = h2.shape[1]
        dropout = _Dropout(ctx.dropout_p, seed) if seed is not None else None
        if dh is None and dy is None:
            return None, None, None, None, None, None, None, None, None
        if dy is None and dropout is None and (not need_dx or ctx.x_dtype == h2.dtype):
            # y unused: LayerNorm is off the loss's path, so weight and bias get
            # no gradient (None, as PyTorch's own graph gives), and d(x) =
            # d(residual) = dh, already in the right dtype.
            return ((dh if need_dx else None), (dh if need_dr else None),
                    None, None, None, None, None, None, None)
        dx2, dr2, dw, db = _ln_backward(
            _rows2d(dy, n_cols) if dy is not None else None,
            _rows2d(dh, n_cols) if dh is not None else None,
            _Forward(h2, None, mean, rstd), weight, ctx.bias_dtype,
            dx_dtype=ctx.x_dtype if need_dx else None, dr_dtype=h2.dtype if need_dr else None,
            compute_dw=need_dw, compute_db=need_db, dropout=dropout,
            dw_into=grad_buffer(weight, ctx.accumulate_grad),
            db_into=grad_buffer(bias, ctx.accumulate_grad))
        shape = ctx.x_shape
        return (dx2.view(shape) if dx2 is not None else None,
                dr2.view(shape) if dr2 is not None else None,
                dw, db, None, None, None, None, None)


# ----------------------------------------------------------------------------- public


def _check_inputs(op, x, residual, weight, bias, eps, out_dtype, seed=None):
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_dim=1, layout="(..., C)")
    n_cols = x.shape[-1]
    check_tensor(op, "residual", residual, dtypes=FLOAT_DTYPES, shape=tuple(x.shape),
                 optional=True)
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES, shape=(n_cols,))
    check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, shape=(n_cols,), optional=True)
    check_tensor(op, "seed", seed, dtypes=(torch.int64,), shape=(1,), optional=True)
    check_same_device(op, x=x, residual=residual, weight=weight, bias=bias, seed=seed)
    if n_cols == 0:
        raise ValueError(f"{op}: x has last dimension 0; LayerNorm needs C >= 1 features")
    widest = max(t.element_size() for t in (x, residual) if t is not None)
    if n_cols > _MAX_ROW_BYTES // widest:
        raise ValueError(f"{op}: x has last dimension {n_cols}; at most {_MAX_ROW_BYTES // widest} "
                         f"supported for {widest}-byte elements (a row must fit in one program)")
    check_real(op, "eps", eps, at_least=0.0)
    if out_dtype is not None:
        check_dtype(op, "out_dtype", out_dtype, FLOAT_DTYPES)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float = 1e-5, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension, with gradients for x, weight and bias.

    x: (..., C), any leading shape (zero rows give an empty result); weight: (C,);
    bias: (C,) or None (then no bias gradient). Each float32, float16 or
    bfloat16, in its own dtype (e.g. bf16 x with fp32 weights), all on one CUDA
    device (CPU only under TRITON_INTERPRET=1). C <= 65536 / x.element_size().
    The last dimension is read with unit stride: a row-strided x is used as it
    is, anything else copied once with `.contiguous()`; so is a weight or bias
    that is not contiguous (a slice, or expanded with stride 0).

    Returns y: contiguous, x's shape, in `out_dtype` (default: x's dtype), equal to
    `F.layer_norm(x.float(), (C,), weight.float(), bias.float(), eps).to(out_dtype)`:
    statistics and accumulation are fp32 and y is rounded once. The gradients
    come in the dtype of their input (dx in x's, dweight in weight's, dbias in
    bias's). The backward is once-differentiable: a gradient through it taken
    with create_graph=True (double backward) raises (PyTorch's op allows it).
    """
    _check_inputs("layer_norm", x, None, weight, bias, eps, out_dtype)
    return _LayerNormFn.apply(x, contiguous(weight), contiguous(bias), float(eps),
                              out_dtype or x.dtype)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None, eps: float = 1e-5, *,
                   out_dtype: torch.dtype | None = None, dropout_p: float = 0.0,
                   seed: torch.Tensor | None = None, accumulate_grad: bool = False):
    """Dropout, residual add and the LayerNorm after it, fused: returns (h, y) with
    h = residual + dropout(x) and y = LayerNorm(h) -- the pre-norm block's
    "dropout, add, LN" (flash-attention's Block contract).

    x: (..., C), the branch output (e.g. bf16 under autocast); residual: x's
    shape, the residual stream (e.g. fp32), or None for the first block (then
    h = dropout(x), e.g. the embeddings' dropout); weight: (C,), bias: (C,) or
    None. Each float32, float16 or bfloat16 in its own dtype, all on one device;
    layout and limits as `layer_norm`. Nothing is cast outside the kernel.

    dropout_p in [0, 1): each element of x is zeroed with probability p and the
    rest scaled by 1 / (1 - p), as `F.dropout(x, p)`; the mask is drawn from
    Philox keyed by `seed` and the element's index, never stored, and drawn
    again in the backward. seed: an int64 tensor of shape (1,) on x's device,
    read on the device, never synchronised, and not to be changed before the
    backward; None (default) draws one per call from the device's default
    generator (gpt2_kernels/_common.py: reproducible under torch.manual_seed, fresh on
    every CUDA-graph replay). p = 0 (the default) runs the kernels compiled
    without dropout: bit-identical to no dropout; a seed given is still checked,
    then not used. p must stay below 1 in float32 too (p <= 1 - 2**-24; see
    gpt2_kernels/_common.py).

    Returns (h, y), contiguous with x's shape: h in residual's dtype (x's
    without a residual; with neither a residual nor dropout h is x itself), y
    in `out_dtype` (default: h's dtype). Equals, with keep the mask drawn
    (x * keep / (1 - p) computed in fp32, not rounded to x's dtype),
    `h = (residual.float() + x.float() * keep / (1 - p)).to(residual.dtype)` and
    `y = F.layer_norm(h.float(), (C,), weight.float(), bias.float(), eps).to(out_dtype)`.
    Backward, in one pass: d(residual) = dh + dLayerNorm(dy) in residual's
    dtype, d(x) = that times keep / (1 - p) in x's dtype (without dropout one
    tensor where the dtypes agree, as with PyTorch's add); dweight and dbias in
    their own dtypes. The backward is once-differentiable: a gradient through
    it taken with create_graph=True (double backward) raises (PyTorch's ops
    allow it).

    accumulate_grad: add dweight and dbias into the parameters' existing
    `.grad` in the reduction that sums them, instead of returning them to
    autograd (see gpt2_kernels/linear.py for when that applies).
    """
    op = "add_layer_norm"
    _check_inputs(op, x, residual, weight, bias, eps, out_dtype, seed)
    check_dropout_p(op, dropout_p)
    check_bool(op, "accumulate_grad", accumulate_grad)
    seed = dropout_seed(op, x.device, dropout_p, seed)
    h_dtype = residual.dtype if residual is not None else x.dtype
    return _AddLayerNormFn.apply(x, residual, contiguous(weight), contiguous(bias), float(eps),
                                 out_dtype or h_dtype, float(dropout_p), seed, accumulate_grad)
