"""GPT-2's input embedding, token plus position, in one pass; its backward adds
straight into the tables' gradients, in a fixed order.

Math, for token ids idx (B, T) and the positions start .. start + T - 1:

    x[b, t]     = wte[idx[b, t]] + wpe[start + t]        (fp32 sum, rounded once to out_dtype)
    backward:   dwte[v] = sum of dx[b, t] over the (b, t) with idx[b, t] = v
                dwpe[start + t] = sum over b of dx[b, t]

Forward: one program per row reads the token's and the position's rows and
writes their sum: no (B, T, C) intermediate per table.

Backward, deterministic (no atomics): the token ids are sorted (a stable sort,
so equal ids keep their order); one program per sorted position that starts a
run of equal ids sums that run's rows of dx in sorted order and writes the
vocabulary row once. One program per position sums over the batch. Sums are
fp32 and rounded once to the table's dtype. A vocabulary the size of GPT-2's
(50304 x 768) is never swept: only the rows the batch used are touched --
where the gradient is added into an existing `.grad` (`accumulate_grad`, as in
gpt2_kernels/linear.py); a gradient handed to autograd instead is a new zeroed
table with those rows written.

Token ids are not range-checked (that would be a host sync): an id outside
[0, V) reads a zero row and gets no gradient (the data loaders check ids).
"""
import torch
import triton
import triton.language as tl

from gpt2_kernels._common import (FLOAT_DTYPES, check_bool, check_dtype, check_int, check_same_device,
                                  check_tensor, grad_buffer, on_device, once_differentiable, round_to)

_ID_DTYPES = (torch.int64, torch.int32)
# A row lives in one program's registers: widths up to this many features.
_MAX_COLS = 16384
_MIN_BLOCK_C = 16
_COLS_PER_WARP = 256
_MAX_WARPS = 8


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _embedding_fwd_kernel(IDX, WTE, WPE, OUT, T, start, n_vocab, n_cols,
                          stride_wte, stride_wpe, stride_out, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    token = tl.load(IDX + row).to(tl.int64)
    valid = (token >= 0) & (token < n_vocab)
    token = tl.where(valid, token, 0)
    position = start + row % T
    # An invalid id reads row 0 (in bounds) and contributes nothing.
    e = tl.load(WTE + token * stride_wte + cols, mask=mask, other=0.0).to(tl.float32)
    e = tl.where(valid, e, 0.0)
    p = tl.load(WPE + position * stride_wpe + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_out + cols, round_to(e + p, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _token_grad_kernel(SORTED_IDS, ORDER, DX, DWTE, n_rows, n_vocab, n_cols, stride_dx, stride_dw,
                       ACCUMULATE: tl.constexpr, BLOCK_C: tl.constexpr):
    """The program at sorted position i, if it starts a run of equal ids, sums
    the run's rows of dx in sorted order into that id's row of dwte."""
    i = tl.program_id(0).to(tl.int64)
    token = tl.load(SORTED_IDS + i).to(tl.int64)
    previous = tl.load(SORTED_IDS + i - 1, mask=i > 0, other=-1).to(tl.int64)
    starts_run = (i == 0) | (token != previous)
    if starts_run & (token >= 0) & (token < n_vocab):
        cols = tl.arange(0, BLOCK_C)
        mask = cols < n_cols
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        j = i
        same = token
        while (same == token) & (j < n_rows):
            r = tl.load(ORDER + j).to(tl.int64)
            acc += tl.load(DX + r * stride_dx + cols, mask=mask, other=0.0).to(tl.float32)
            j += 1
            same = tl.load(SORTED_IDS + j, mask=j < n_rows, other=-1).to(tl.int64)
        out = DWTE + token * stride_dw + cols
        if ACCUMULATE:
            acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
        tl.store(out, acc.to(DWTE.dtype.element_ty), mask=mask)


@triton.jit
def _position_grad_kernel(DX, DWPE, n_batch, T, start, n_cols, stride_dx, stride_dw,
                          ACCUMULATE: tl.constexpr, BLOCK_C: tl.constexpr):
    """dwpe[start + t] (+)= the sum over the batch of dx[b, t], in batch order."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for b in range(0, n_batch):
        acc += tl.load(DX + (b * T + t) * stride_dx + cols, mask=mask, other=0.0).to(tl.float32)
    out = DWPE + (start + t) * stride_dw + cols
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(DWPE.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _block_c(n_cols: int) -> tuple[int, int]:
    block = max(triton.next_power_of_2(n_cols), _MIN_BLOCK_C)
    return block, min(max(block // _COLS_PER_WARP, 1), _MAX_WARPS)


def _forward(idx, wte, wpe, start, out_dtype):
    B, T = idx.shape
    n_cols = wte.shape[1]
    out = torch.empty((B, T, n_cols), device=wte.device, dtype=out_dtype)
    if out.numel():
        block, warps = _block_c(n_cols)
        _embedding_fwd_kernel[(B * T,)](idx, wte, wpe, out, T, start, wte.shape[0], n_cols,
                                        wte.stride(0), wpe.stride(0), n_cols,
                                        BLOCK_C=block, num_warps=warps)
    return out


def _table_grad(table, target, accumulate_into):
    """Where a table's gradient goes: its .grad (added to) or a new zeroed table."""
    if accumulate_into is not None:
        return accumulate_into
    return torch.zeros_like(table) if target else None


def _backward(dx, idx, wte, wpe, start, need_wte, need_wpe, accumulate):
    B, T, n_cols = dx.shape
    dx2 = dx.reshape(B * T, n_cols)
    if dx2.stride(-1) != 1:
        dx2 = dx2.contiguous()
    into_wte = grad_buffer(wte, accumulate) if need_wte else None
    into_wpe = grad_buffer(wpe, accumulate) if need_wpe else None
    dwte = _table_grad(wte, need_wte, into_wte)
    dwpe = _table_grad(wpe, need_wpe, into_wpe)
    block, warps = _block_c(n_cols)
    if need_wte and B * T:
        sorted_ids, order = torch.sort(idx.reshape(-1), stable=True)
        _token_grad_kernel[(B * T,)](sorted_ids, order, dx2, dwte, B * T, wte.shape[0], n_cols,
                                     dx2.stride(0), dwte.stride(0), ACCUMULATE=into_wte is not None,
                                     BLOCK_C=block, num_warps=warps)
    if need_wpe and T:
        _position_grad_kernel[(T,)](dx2, dwpe, B, T, start, n_cols, dx2.stride(0), dwpe.stride(0),
                                    ACCUMULATE=into_wpe is not None, BLOCK_C=block, num_warps=warps)
    return (None if into_wte is not None else dwte), (None if into_wpe is not None else dwpe)


# ----------------------------------------------------------------------------- autograd


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, wte, wpe, start, out_dtype, accumulate_grad):
        ctx.save_for_backward(idx, wte, wpe)
        ctx.start, ctx.accumulate_grad = start, accumulate_grad
        return _forward(idx, wte, wpe, start, out_dtype)

    @staticmethod
    @once_differentiable("embedding")
    def backward(ctx, dx):
        idx, wte, wpe = ctx.saved_tensors
        dwte, dwpe = _backward(dx, idx, wte, wpe, ctx.start, ctx.needs_input_grad[1],
                               ctx.needs_input_grad[2], ctx.accumulate_grad)
        return None, dwte, dwpe, None, None, None


# ----------------------------------------------------------------------------- public


def embedding(idx: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor, start: int = 0, *,
              out_dtype: torch.dtype | None = None, accumulate_grad: bool = False) -> torch.Tensor:
    """GPT-2's input embedding: wte[idx] + wpe[start:start + T], in one Triton pass.

    Equals ``(F.embedding(idx, wte) + F.embedding(torch.arange(start, start + T), wpe)).to(out_dtype)``
    with the sum taken in fp32 and rounded once.

    idx: (B, T) int64 or int32 token ids, contiguous (ids outside [0, V) read
    a zero row and get no gradient; they are not checked). wte: (V, C) and wpe:
    (P, C) with start + T <= P, each float32, float16 or bfloat16 in its own
    dtype, last dimension contiguous; C <= 16384. out_dtype: the output's dtype
    (default wte's). accumulate_grad: add each table's gradient into its
    existing `.grad` instead of returning it to autograd (gpt2_kernels/linear.py
    says when that applies). All on one CUDA device (CPU only under TRITON_INTERPRET=1).

    Returns (B, T, C) in out_dtype. The tables' gradients come in their own
    dtypes, summed in fp32 in a fixed order (deterministic). The backward is
    once-differentiable: a gradient through it taken with create_graph=True
    (double backward) raises (PyTorch's ops allow it).
    """
    op = "embedding"
    check_tensor(op, "idx", idx, dtypes=_ID_DTYPES, dim=2, layout="(B, T)")
    check_tensor(op, "wte", wte, dtypes=FLOAT_DTYPES, dim=2, layout="(V, C)", last_stride_one=True)
    check_tensor(op, "wpe", wpe, dtypes=FLOAT_DTYPES, shape=(None, wte.shape[1]),
                 layout="(positions, C) with wte's C", last_stride_one=True)
    check_same_device(op, idx=idx, wte=wte, wpe=wpe)
    start = check_int(op, "start", start, at_least=0)
    check_bool(op, "accumulate_grad", accumulate_grad)
    if start + idx.shape[1] > wpe.shape[0]:
        raise ValueError(f"{op}: positions {start} .. {start + idx.shape[1] - 1} need {start + idx.shape[1]} "
                         f"rows of wpe; it has {wpe.shape[0]}")
    if wte.shape[1] > _MAX_COLS:
        raise ValueError(f"{op}: wte has width {wte.shape[1]}; at most {_MAX_COLS} supported "
                         "(a row must fit in one program)")
    out_dtype = out_dtype or wte.dtype
    check_dtype(op, "out_dtype", out_dtype, FLOAT_DTYPES)
    idx = idx.contiguous()
    with on_device(idx):
        if torch.is_grad_enabled() and (wte.requires_grad or wpe.requires_grad):
            return _Embedding.apply(idx, wte, wpe, start, out_dtype, accumulate_grad)
        return _forward(idx, wte, wpe, start, out_dtype)
