"""LayerNorm over the last dimension, and the fused residual-add + LayerNorm of a
transformer block, as Triton kernels with their backward passes.

Layout: kernels (forward, backward, weight-gradient reduction), launchers, the
autograd Functions, then the two public functions `layer_norm` and
`add_layer_norm`.

Design:
- Forward: one program per row; the whole row lives in registers (BLOCK_N is the
  next power of two of C, masked), so the activations are read once and the
  variance is computed from the centred row (no E[x^2] - E[x]^2 cancellation).
  mean and rstd are kept in fp32, shape (rows,), and saved for backward.
- Backward: each program owns a contiguous group of rows; it writes dx row by
  row and accumulates dweight/dbias for its group in fp32 registers, stored to a
  (num_programs, C) fp32 buffer. A second small kernel sums that buffer over
  programs in a fixed order: deterministic, no atomics.
- The fused variant reads x and residual once, writes h = x + residual and
  y = LN(h), saving a full write+read of the activations compared to a separate
  add; its backward adds the upstream grad of h into dLN, so
  d(x) = d(residual) = dh + dLN(dy) comes out of the same pass.
"""
import numbers

import torch
import triton
import triton.language as tl

from kernels._common import (check_device as _check_device, interpreting as _interpreting,
                             on_device as _on_device)


@triton.jit
def _ln_fwd_kernel(
    X, R, H, Y, W, B, Mean, Rstd,
    stride_x_row, stride_r_row, stride_h_row, stride_y_row,
    N_COLS, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # int64 before multiplying by strides: rows * stride can pass 2**31.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N_COLS
    x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r_row + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + row * stride_h_row + cols, h, mask=mask)
        # Normalise the rounded h, exactly what F.layer_norm(x + residual) sees,
        # and what backward re-reads.
        x = h.to(tl.float32)
    mean = tl.sum(x, axis=0) / N_COLS
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / N_COLS
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_kernel(
    X, W, DY, DH, DX, Mean, Rstd, DW_PART, DB_PART,
    stride_x_row, stride_dy_row, stride_dh_row, stride_dx_row,
    N_ROWS, N_COLS, rows_per_prog,
    HAS_DH: tl.constexpr, COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N_COLS
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N_ROWS)
    # Advance 64-bit pointers row by row: row * stride can pass 2**31 elements.
    start64 = row_start.to(tl.int64)
    X += start64 * stride_x_row
    DY += start64 * stride_dy_row
    if HAS_DH:
        DH += start64 * stride_dh_row
    if COMPUTE_DX:
        DX += start64 * stride_dx_row
    for row in range(row_start, row_end):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        if COMPUTE_DW:
            dw += dy * xhat
        if COMPUTE_DB:
            db += dy
        if COMPUTE_DX:
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / N_COLS
            c2 = tl.sum(wdy, axis=0) / N_COLS
            dx = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + cols, mask=mask, other=0.0).to(tl.float32)
                DH += stride_dh_row
            tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
            DX += stride_dx_row
        X += stride_x_row
        DY += stride_dy_row
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
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
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
        tl.store(DW + cols, tl.sum(acc_w, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB + cols, tl.sum(acc_b, axis=0).to(DB.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------- launchers

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _block_n(n_cols: int) -> int:
    # Whole row in one block; at least 16 wide so tiny C avoids degenerate
    # 1- or 2-element layouts (masking makes the extra lanes inert).
    return max(triton.next_power_of_2(n_cols), 16)


def _num_warps(block_n: int) -> int:
    # As in Triton's tutorial 05: one warp per 256 columns (8 per thread), at most 16.
    return min(max(block_n // 256, 1), 16)


def _rows2d(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., C) -> (rows, C) with unit column stride, as a view when possible so
    a row stride (e.g. a slice of a wider tensor) is handled without a copy."""
    t2 = t.reshape(-1, n_cols)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _ln_forward(x, residual, weight, bias, eps, out_dtype):
    """x, residual: (..., C), viewed as rows; y2 is written in out_dtype.
    Returns (the rows that were normalised: h2 = x + residual, or x2 without a
    residual; y2; mean; rstd; the contiguous weight), all the backward needs."""
    n_cols = x.shape[-1]
    x2 = _rows2d(x, n_cols)
    residual2 = _rows2d(residual, n_cols) if residual is not None else None
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n_rows = x2.shape[0]
    y2 = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device)
    h2 = torch.empty_like(x2) if residual2 is not None else None
    mean = torch.empty((n_rows,), dtype=torch.float32, device=x2.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x2.device)
    if n_rows == 0:
        return (h2 if h2 is not None else x2), y2, mean, rstd, weight
    block_n = _block_n(n_cols)
    r_arg = residual2 if residual2 is not None else x2
    h_arg = h2 if h2 is not None else y2
    with _on_device(x2):
        _ln_fwd_kernel[(n_rows,)](
            x2, r_arg, h_arg, y2, weight, bias if bias is not None else weight, mean, rstd,
            x2.stride(0), r_arg.stride(0), h_arg.stride(0), y2.stride(0),
            n_cols, eps,
            HAS_RESIDUAL=residual2 is not None, HAS_BIAS=bias is not None,
            BLOCK_N=block_n, num_warps=_num_warps(block_n),
        )
    return (h2 if h2 is not None else x2), y2, mean, rstd, weight


def _bwd_num_programs(x2: torch.Tensor, n_rows: int) -> int:
    if x2.device.type == "cuda":
        # Several programs per SM hide the latency of each row's loads; more
        # would grow the (programs, C) partial buffers the reduction reads.
        target = 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count
    else:
        # The interpreter runs programs one by one: few programs, several rows
        # each, still exercises the group boundaries.
        target = 8
    return max(1, min(n_rows, target))


def _ln_backward(dy2, dh2, x2, weight, mean, rstd, compute_dx, compute_dw, compute_db):
    """dy2, dh2 (or None), x2: (rows, C), unit column stride. Returns (dx2, dw, db),
    None for what is not computed. dx2 = dh2 + dLN(dy2)."""
    n_rows, n_cols = x2.shape
    dx2 = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device) if compute_dx else None
    if n_rows == 0:
        # Sums over zero rows are zero (torch.zeros, not a launch).
        dw = torch.zeros_like(weight) if compute_dw else None
        db = torch.zeros_like(weight) if compute_db else None
        return dx2, dw, db
    block_n = _block_n(n_cols)
    n_progs = _bwd_num_programs(x2, n_rows)
    rows_per_prog = triton.cdiv(n_rows, n_progs)
    n_progs = triton.cdiv(n_rows, rows_per_prog)  # no program without rows
    dw_part = (torch.empty((n_progs, n_cols), dtype=torch.float32, device=x2.device)
               if compute_dw else None)
    db_part = (torch.empty((n_progs, n_cols), dtype=torch.float32, device=x2.device)
               if compute_db else None)
    dummy = mean  # never dereferenced where its flag is off
    with _on_device(x2):
        _ln_bwd_kernel[(n_progs,)](
            x2, weight, dy2,
            dh2 if dh2 is not None else dummy,
            dx2 if dx2 is not None else dummy,
            mean, rstd,
            dw_part if dw_part is not None else dummy,
            db_part if db_part is not None else dummy,
            x2.stride(0), dy2.stride(0),
            dh2.stride(0) if dh2 is not None else 0,
            dx2.stride(0) if dx2 is not None else 0,
            n_rows, n_cols, rows_per_prog,
            HAS_DH=dh2 is not None, COMPUTE_DX=compute_dx,
            COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
            BLOCK_N=block_n, num_warps=_num_warps(block_n),
        )
        dw = db = None
        if compute_dw or compute_db:
            dw = torch.empty_like(weight) if compute_dw else None
            db = torch.empty_like(weight) if compute_db else None
            if _interpreting():
                block_p, block_c = triton.next_power_of_2(n_progs), min(block_n, 1024)
            else:
                block_p, block_c = 64, 32
            _ln_bwd_reduce_kernel[(triton.cdiv(n_cols, block_c),)](
                dw_part if dw_part is not None else dummy,
                db_part if db_part is not None else dummy,
                dw if dw is not None else dummy,
                db if db is not None else dummy,
                n_progs, n_cols,
                COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
                BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
            )
    return dx2, dw, db


# ----------------------------------------------------------------------------- autograd


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        x2, y2, mean, rstd, weight = _ln_forward(x, None, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y2.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        compute_dx = ctx.needs_input_grad[0]
        compute_dw = ctx.needs_input_grad[1]
        compute_db = ctx.has_bias and ctx.needs_input_grad[2]
        if not (compute_dx or compute_dw or compute_db):
            return None, None, None, None, None
        dy2 = _rows2d(dy, x2.shape[1])
        dx2, dw, db = _ln_backward(dy2, None, x2, weight, mean, rstd,
                                   compute_dx, compute_dw, compute_db)
        dx = dx2.view(ctx.x_shape) if dx2 is not None else None
        return dx, dw, db, None, None


class _AddLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, out_dtype):
        h2, y2, mean, rstd, weight = _ln_forward(x, residual, weight, bias, eps, out_dtype)
        ctx.save_for_backward(h2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        # An unused output must arrive as None, not as a zero tensor to read.
        ctx.set_materialize_grads(False)
        return h2.view(x.shape), y2.view(x.shape)

    @staticmethod
    def backward(ctx, dh, dy):
        h2, weight, mean, rstd = ctx.saved_tensors
        compute_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        compute_dw = ctx.needs_input_grad[2] and dy is not None
        compute_db = ctx.has_bias and ctx.needs_input_grad[3] and dy is not None
        if dy is None:
            # y unused: LayerNorm is not on the loss's path, so weight and bias
            # get no gradient (None, as PyTorch's own graph would give).
            dx = dh if compute_dx else None
            dw = db = None
        elif compute_dx or compute_dw or compute_db:
            n_cols = h2.shape[1]
            dy2 = _rows2d(dy, n_cols)
            dh2 = _rows2d(dh, n_cols) if dh is not None else None
            dx2, dw, db = _ln_backward(dy2, dh2, h2, weight, mean, rstd,
                                       compute_dx, compute_dw, compute_db)
            dx = dx2.view(ctx.x_shape) if dx2 is not None else None
        else:
            dx = dw = db = None
        # x and residual get the same gradient tensor, as PyTorch's own add does.
        return (dx if ctx.needs_input_grad[0] else None,
                dx if ctx.needs_input_grad[1] else None,
                dw, db, None, None)


# ----------------------------------------------------------------------------- public


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _check(fn: str, x, weight, bias, eps, residual=None, has_residual=False, out_dtype=None):
    named = [("x", x)]
    if has_residual:
        named.append(("residual", residual))
    named += [("weight", weight), ("bias", bias)]
    for name, t in named:
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    dev = x.device
    _check_device(fn, "x", dev)
    for name, t in named[1:]:
        if t is not None and t.device != dev:
            raise ValueError(f"{fn}: {name} is on device '{t.device}' but x is on '{dev}'; "
                             "all tensors must be on the same device")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: x has dtype {_dtype_name(x.dtype)}; supported: "
                        + ", ".join(_dtype_name(d) for d in _SUPPORTED_DTYPES))
    for name, t in named[1:]:
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{fn}: {name} has dtype {_dtype_name(t.dtype)} but x has "
                            f"{_dtype_name(x.dtype)}; all tensors must have the same dtype")
    if x.dim() < 1:
        raise ValueError(f"{fn}: x is 0-d; expected shape (..., C) with at least one dimension")
    n_cols = x.shape[-1]
    if n_cols == 0:
        raise ValueError(f"{fn}: x has last dimension 0; LayerNorm needs C >= 1 features")
    max_cols = 65536 // x.element_size()
    if n_cols > max_cols:
        raise ValueError(f"{fn}: x has last dimension {n_cols}; at most {max_cols} supported "
                         f"for {_dtype_name(x.dtype)} (a row must fit in one program)")
    if has_residual and residual.shape != x.shape:
        raise ValueError(f"{fn}: residual has shape {tuple(residual.shape)}; "
                         f"expected x's shape {tuple(x.shape)}")
    for name, t in named[-2:]:
        if t is not None and tuple(t.shape) != (n_cols,):
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}; expected ({n_cols},)")
    if out_dtype is not None and out_dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: out_dtype is {out_dtype}; supported: "
                        + ", ".join(_dtype_name(d) for d in _SUPPORTED_DTYPES))
    if (not isinstance(eps, numbers.Real) or isinstance(eps, bool)
            or not (eps >= 0.0) or eps == float("inf")):
        raise ValueError(f"{fn}: eps must be a finite real number >= 0, got {eps!r}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float = 1e-5, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension, with gradients for x, weight and bias.

    x: (..., C), any leading shape (rows = x.numel() // C; zero rows give an empty
    result), float32, float16 or bfloat16, on CUDA (CPU only under TRITON_INTERPRET=1).
    The last dimension is read with unit stride: when x.reshape(-1, C) is a view
    with unit column stride (contiguous x, or a row-strided slice of a wider 2-D
    tensor) no copy is made; otherwise x is copied with `.contiguous()`.
    C <= 65536 / x.element_size() (16384 for fp32, 32768 for fp16/bf16).
    weight: (C,), bias: (C,) or None (treated as zero; then no bias gradient);
    same dtype and device as x. Statistics and accumulation are fp32.

    Returns y: contiguous, x's shape, in `out_dtype` (default: x's dtype). Equals
    `torch.nn.functional.layer_norm(x, (C,), weight, bias, eps).to(out_dtype)`.
    out_dtype lets an fp32 residual stream feed bf16 matmuls (autocast) without a
    separate cast pass: y is rounded once, from the fp32 result.
    """
    _check("layer_norm", x, weight, bias, eps, out_dtype=out_dtype)
    return _LayerNormFn.apply(x, weight, bias, float(eps), out_dtype or x.dtype)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, eps: float = 1e-5, *,
                   out_dtype: torch.dtype | None = None):
    """Residual add fused with LayerNorm: h = x + residual; y = LayerNorm(h).

    x, residual: (..., C), same shape, dtype (float32, float16, bfloat16) and
    device; weight: (C,), bias: (C,) or None; layout and limits as `layer_norm`.
    h is rounded to x's dtype before it is normalised, as in PyTorch.

    Returns (h, y), both contiguous with x's shape; h in x's dtype, y in `out_dtype`
    (default: x's dtype). Equals
    `(x + residual, F.layer_norm(x + residual, (C,), weight, bias, eps).to(out_dtype))`.
    Backward: d(x) = d(residual) = dh + dLayerNorm(dy), computed in one pass;
    x and residual receive the same gradient tensor (as with PyTorch's add).
    """
    _check("add_layer_norm", x, weight, bias, eps, residual=residual, has_residual=True,
           out_dtype=out_dtype)
    return _AddLayerNormFn.apply(x, residual, weight, bias, float(eps), out_dtype or x.dtype)
