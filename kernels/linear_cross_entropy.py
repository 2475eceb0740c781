"""Fused linear + cross-entropy for the LM head, without materialising N x V logits.

Rows are processed in chunks. For each chunk the logits come from one cuBLAS
matmul; one Triton kernel then computes, per row, the logsumexp over the real
classes, the row's loss, and overwrites the chunk's logits buffer (our own
temporary) with d(loss)/d(logits). Two more matmuls turn that into this chunk's
share of dx and dweight. The gradient is therefore computed in the forward pass
(as Liger-Kernel does) and backward only scales it by grad_output, so peak
memory holds one chunk of logits instead of all N x V of them plus their
float32 upcast.
"""

import torch
import triton
import triton.language as tl

from kernels._common import (check_device as _check_kernel_device, interpreting as _interpreting,
                             on_device as _on_device)


@triton.jit
def _ce_fwd_grad_kernel(
    logits_ptr, stride_row,
    targets_ptr, loss_ptr, n_counted_ptr,
    n_cols, n_classes, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row: loss of the row and, in place, its logits gradient."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row

    target = tl.load(targets_ptr + row).to(tl.int64)
    counted = target != ignore_index
    # Out-of-range targets are rejected by the launcher when check_targets is
    # on; clamping here keeps a disabled check from reading out of bounds.
    valid = counted & (target >= 0) & (target < n_classes)
    safe_target = tl.where(valid, target, 0)

    # Online logsumexp over the real classes only: padded vocab columns
    # (>= n_classes) behave as -inf logits.
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.full((), 0.0, tl.float32)
    # The target's logit is picked up in this read-only pass: read after the
    # gradient pass began, it could already hold another warp's gradient (the
    # row is overwritten in place and warps are not ordered without a barrier).
    x_target = tl.full((), 0.0, tl.float32)
    for start in range(0, n_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_classes, other=float("-inf")).to(tl.float32)
        x_target += tl.sum(tl.where(cols == safe_target, x, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    loss = tl.where(counted, lse - x_target, 0.0)
    tl.store(loss_ptr + row, loss)

    if COMPUTE_GRAD:
        # The mean over counted rows is folded into the gradient here; the count
        # is read from device memory so the launcher never syncs on it.
        n_counted = tl.load(n_counted_ptr).to(tl.float32)
        scale = tl.where(counted, 1.0 / tl.maximum(n_counted, 1.0), 0.0)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < n_classes, other=float("-inf")).to(tl.float32)
            p = tl.exp(x - lse)
            g = (p - tl.where(cols == safe_target, 1.0, 0.0)) * scale
            tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)


# A chunk's logits may take this many bytes: 4096 rows of GPT-2's padded vocab
# in bf16 (412 MB). Big enough that the chunk matmuls run at full cuBLAS speed,
# small enough to be a fraction of the full N x V logits.
_CHUNK_BYTES = 512 * 2**20


def _default_chunk_size(n_rows: int, n_cols: int, elem_size: int) -> int:
    rows = max(1, _CHUNK_BYTES // max(1, n_cols * elem_size))
    rows = 1 << (rows.bit_length() - 1)  # a power of two keeps matmul shapes tidy
    return max(1, min(n_rows, rows))


def _ce_config(n_cols: int):
    """(BLOCK_V, num_warps). No autotune: the kernel overwrites its input in
    place, so an autotuner's repeated trial runs would corrupt it."""
    if _interpreting():
        # Small blocks so interpreted tests cross several block boundaries.
        return min(256, triton.next_power_of_2(n_cols)), 1
    return min(8192, triton.next_power_of_2(n_cols)), 16


def _ce_chunk(logits, targets, loss_rows, n_counted, n_classes, ignore_index, compute_grad):
    """Fills loss_rows for the chunk; if compute_grad, logits becomes dloss/dlogits."""
    n_rows, n_cols = logits.shape
    block_v, num_warps = _ce_config(n_cols)
    _ce_fwd_grad_kernel[(n_rows,)](
        logits, logits.stride(0),
        targets, loss_rows, n_counted,
        n_cols, n_classes, ignore_index,
        COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=num_warps,
    )


def _mm_fp32_out(a, b):
    """a @ b with a float32 result. Rounding each chunk's dweight to bf16/fp16
    before summing the chunks would double PyTorch's error, so half-precision
    operands use cuBLAS's fp32-output GEMM (torch >= 2.8) where it exists."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return torch.mm(a.float(), b.float())


def _linear_ce_forward(x2, weight, targets, ignore_index, num_classes, chunk_size,
                       compute_dx, compute_dw):
    """Returns (loss fp32 scalar, dx or None, dweight or None), grads for grad_output=1."""
    n, c = x2.shape
    v = weight.shape[0]
    device = x2.device
    loss_rows = torch.empty(n, device=device, dtype=torch.float32)
    n_counted = (targets != ignore_index).sum()
    compute_grad = compute_dx or compute_dw
    dx = torch.empty((n, c), device=device, dtype=x2.dtype) if compute_dx else None

    if chunk_size is None:
        chunk_size = _default_chunk_size(n, v, x2.element_size())
    n_chunks = triton.cdiv(n, chunk_size)
    autocast = torch.is_autocast_enabled(device.type)
    dw_acc = None
    if compute_dw and n_chunks > 1:
        # Chunk contributions summed in fp32, cast to the weight's dtype once.
        dw_acc = torch.zeros((v, c), device=device, dtype=torch.float32)
    dw = None

    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        xc = x2[start:end]
        logits = torch.matmul(xc, weight.t())
        _ce_chunk(logits, targets[start:end], loss_rows[start:end], n_counted,
                  num_classes, ignore_index, compute_grad)
        if compute_dx:
            if not autocast and logits.dtype == dx.dtype:
                torch.mm(logits, weight, out=dx[start:end])
            else:
                dx[start:end].copy_(torch.mm(logits, weight))
        if compute_dw:
            if dw_acc is None:
                dw = torch.mm(logits.t(), xc.to(logits.dtype)).to(weight.dtype)
            else:
                dw_acc.add_(_mm_fp32_out(logits.t(), xc.to(logits.dtype)))
        del logits
    if dw_acc is not None:
        dw = dw_acc.to(weight.dtype)
    loss = loss_rows.sum() / n_counted.clamp(min=1).to(torch.float32)
    return loss, dx, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, num_classes, chunk_size,
                compute_dx, compute_dw):
        x2 = x.reshape(-1, x.shape[-1])
        loss, dx, dw = _linear_ce_forward(x2, weight, targets, ignore_index, num_classes,
                                          chunk_size, compute_dx, compute_dw)
        # The gradients are our own buffers, never inputs; backward scales them
        # out of place so a retained graph can run backward twice.
        ctx.x_shape = x.shape
        ctx.save_for_backward(
            dx if dx is not None else x.new_empty(0),
            dw if dw is not None else weight.new_empty(0),
        )
        ctx.has_dx = dx is not None
        ctx.has_dw = dw is not None
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dx_saved, dw_saved = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0] and ctx.has_dx:
            dx = (dx_saved * grad_out.to(dx_saved.dtype)).view(ctx.x_shape)
        if ctx.needs_input_grad[1] and ctx.has_dw:
            dw = dw_saved * grad_out.to(dw_saved.dtype)
        return dx, dw, None, None, None, None, None, None


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TARGET_DTYPES = (torch.int64, torch.int32)


def _check_same_device(name, tensors):
    device = tensors[0][1].device
    for arg, t in tensors:
        if t.device != device:
            raise ValueError(f"{name}: {arg} is on {t.device} but x is on {device}; "
                             "all inputs must be on the same device")
    _check_kernel_device(name, "x", device)


def linear_cross_entropy(x, weight, targets, ignore_index=-100, num_classes=None,
                         chunk_size=None, check_targets=True):
    """Mean cross-entropy of the logits x @ weight.T, without holding them all.

    Args:
        x: (..., C) float32/float16/bfloat16 hidden states (leading dims are flattened to N rows).
        weight: (V, C), same dtype as x: the (tied) embedding, possibly with padded rows.
        targets: (...) or (N,), int64 or int32 class indices; entries equal to
            ignore_index do not count.
        ignore_index: target value that is skipped (default -100).
        num_classes: the number of real classes (default V). Logit columns
            >= num_classes are excluded from the softmax and the matching weight
            rows get a zero gradient.
        chunk_size: rows per chunk (default: as many as keep a chunk's logits
            within 512 MiB). Exposed mainly for tests.
        check_targets: reject targets outside [0, num_classes) that are not
            ignore_index. This costs one device reduction and a host sync; it is
            skipped automatically while a CUDA graph is being captured. With the
            check off, such targets give a meaningless loss (but no bad memory access).

    Returns:
        A float32 scalar equal, in value and in the gradients for x and weight, to
        ``F.cross_entropy((x @ weight.T)[..., :num_classes].float().flatten(0, -2),
        targets.flatten(), ignore_index=ignore_index)``; the logits are computed in
        the inputs' dtype (or the autocast dtype) and the softmax in float32.
        When no target counts (all ignored, or N == 0) the loss is 0 and the
        gradients are zero, where PyTorch returns nan.

    The gradient is computed during the forward pass when x or weight requires
    grad, so backward is two elementwise scalings.
    """
    name = "linear_cross_entropy"
    for arg, t in (("x", x), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    _check_same_device(name, [("x", x), ("weight", weight), ("targets", targets)])
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if weight.dtype != x.dtype:
        raise TypeError(f"{name}: weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    if targets.dtype not in _TARGET_DTYPES:
        raise TypeError(f"{name}: targets has dtype {targets.dtype}; supported: int64, int32")
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least 1 dimension (..., C), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D (V, C), got shape {tuple(weight.shape)}")
    v, c = weight.shape
    if x.shape[-1] != c:
        raise ValueError(f"{name}: x has {x.shape[-1]} features but weight has {c} (weight is (V, C))")
    n = x.numel() // c if c else 0
    if tuple(targets.shape) not in (tuple(x.shape[:-1]), (n,)):
        raise ValueError(f"{name}: targets has shape {tuple(targets.shape)}; expected "
                         f"{tuple(x.shape[:-1])} or ({n},) to match x {tuple(x.shape)}")
    if v == 0 or c == 0:
        raise ValueError(f"{name}: weight has shape {tuple(weight.shape)}; V and C must be positive")
    if num_classes is None:
        num_classes = v
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= v:
        raise ValueError(f"{name}: num_classes is {num_classes!r}; must be an int in 1..{v} (weight rows)")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{name}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{name}: chunk_size is {chunk_size!r}; must be a positive int or None")

    targets = targets.reshape(-1).contiguous()
    capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if check_targets and n and not capturing:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise ValueError(f"{name}: targets contains {first}, outside [0, {num_classes}) "
                             f"and not ignore_index ({ignore_index})")

    grad_on = torch.is_grad_enabled()
    compute_dx = grad_on and x.requires_grad
    compute_dw = grad_on and weight.requires_grad
    if n == 0:
        # Nothing counts: loss 0 with zero gradients, consistent with all-ignored.
        return (x.sum() * 0 + weight.sum() * 0).float()
    with _on_device(x):  # the gradients are computed here, in the forward pass
        return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, num_classes,
                                         chunk_size, compute_dx, compute_dw)
