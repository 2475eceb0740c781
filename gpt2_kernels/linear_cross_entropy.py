"""The LM head and its cross-entropy loss fused, without materialising N x V logits.

Math, for rows x_i (N of them, C features), weight W (V x C, of which the first
`num_classes` rows are real classes and the rest padding), targets t_i:

    z_i    = W x_i                                   (logits; padded classes excluded below)
    lse_i  = log sum_{c < num_classes} exp(z_ic)
    loss   = (1 / n) sum_{i counted} (lse_i - z_{i t_i}),   n = #{i : t_i != ignore_index}
    dz_ic  = (softmax(z_i)_c - [c == t_i]) / n  for counted rows and real classes, else 0
    dx     = dz W,   dW = dz^T x

When no row counts (all targets ignored, or N == 0) the loss is 0 and every
gradient is zero (PyTorch's F.cross_entropy returns nan there).

Rows are processed in chunks. For each chunk the logits come from one Triton
matmul whose epilogue also stores, per row and column tile, the max and the sum
of exp over the tile's real classes (one_pass; otherwise from cuBLAS); one Triton
kernel then computes, per row, the logsumexp (from those pieces, or from a first
pass over the row) and the row's loss, and overwrites the chunk's logits buffer
(our own temporary) with d(loss)/d(logits): one read and one write of the
logits. Two more matmuls turn that into this chunk's share of dx and of dW; dW
is accumulated inside the GEMM (beta = 1) into one fp32 buffer (or the weight's
own .grad), never rounded to 16 bits before the end. The gradient is thus
computed in the forward pass (as Liger-Kernel does) and the backward only scales
it by grad_output, or, when the training step gives grad_output in advance, does
nothing: peak memory holds one chunk of logits instead of all N x V of them plus
their fp32 upcast.

The kernel's loads are masked on the logits buffer's width V (GPT-2 pads the
vocabulary to a multiple of 64, so the masks are constant over each vector and
the loads vectorise); padded classes are kept out of the softmax by a
`tl.where` on the column index. The target's logit is one scalar load per row.
"""
import contextlib
import math

import torch
import triton
import triton.language as tl

from gpt2_kernels._common import (FLOAT_DTYPES, check_bool, check_int, check_real, check_same_device,
                                  check_tensor, grad_buffer, on_device, once_differentiable, pick)
from gpt2_kernels._matmul import EPILOGUE_LSE, lse_block_n, matmul
from gpt2_kernels.linear import check_compute_weight, compute_copy

_TARGET_DTYPES = (torch.int64, torch.int32)
# A chunk's logits may take this many bytes: 4096 rows of GPT-2's padded vocab
# in bf16 (412 MB). Big enough that the chunk matmuls run at full cuBLAS speed,
# small enough to be a fraction of the full N x V logits.
_CHUNK_BYTES = 512 * 2**20
# Row kernel tiles (BLOCK_V at most, num_warps). No autotune: the kernel
# overwrites its input in place, so an autotuner's trial runs would corrupt it.
# Under the interpreter small blocks make tests cross several block boundaries.
_ROW_TILE_GPU = (8192, 16)
_ROW_TILE_INTERPRETER = (256, 1)
# The log-sum-exp pieces a row combines are loaded as one vector at least this wide.
_MIN_BLOCK_P = 16


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _ce_fwd_grad_kernel(
    logits_ptr, stride_row,
    targets_ptr, loss_ptr, n_counted_ptr, lse_max_ptr, lse_sum_ptr, stride_lse, n_parts,
    n_cols, n_classes, ignore_index, grad_scale,
    COMPUTE_GRAD: tl.constexpr, LSE_FROM_PARTS: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """One program per row: the row's loss and, in place, its logits gradient
    (times grad_scale). With LSE_FROM_PARTS the row's log-sum-exp comes from the
    logits matmul's pieces (max and sum of exp per column tile) and the logits
    are read once; otherwise a first pass over the row computes it."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)

    target = tl.load(targets_ptr + row).to(tl.int64)
    counted = target != ignore_index
    # Out-of-range targets are rejected by the launcher when check_targets is
    # on; clamping here keeps a disabled check from reading out of bounds.
    valid = counted & (target >= 0) & (target < n_classes)
    safe_target = tl.where(valid, target, 0)
    # The target's logit, read before any of the row is overwritten below.
    x_target = tl.load(row_ptr + safe_target).to(tl.float32)

    if LSE_FROM_PARTS:
        # Tiles without a real class hold max -inf and sum 0: they add nothing.
        parts = tl.arange(0, BLOCK_P)
        in_parts = parts < n_parts
        part_max = tl.load(lse_max_ptr + row * stride_lse + parts, mask=in_parts, other=float("-inf"))
        part_sum = tl.load(lse_sum_ptr + row * stride_lse + parts, mask=in_parts, other=0.0)
        m = tl.max(part_max, axis=0)
        lse = m + tl.log(tl.sum(part_sum * tl.exp(part_max - m), axis=0))
    else:
        # Online logsumexp over the real classes. The load mask is on the buffer's
        # width (vector-friendly); the padded classes become -inf by the column index.
        m = tl.full((), float("-inf"), tl.float32)
        d = tl.full((), 0.0, tl.float32)
        for start in range(0, n_classes, BLOCK_V):
            cols = start + offs
            x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            x = tl.where(cols < n_classes, x, float("-inf"))
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
        scale = tl.where(counted, grad_scale / tl.maximum(n_counted, 1.0), 0.0)
        # Every warp's read of the target logit lands before any warp
        # overwrites the row (a barrier orders memory within the program).
        tl.debug_barrier()
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            in_row = cols < n_cols
            x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            p = tl.where(cols < n_classes, tl.exp(x - lse), 0.0)
            g = (p - tl.where(cols == safe_target, 1.0, 0.0)) * scale
            tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------- launchers


def _default_chunk_rows(n_rows: int, n_cols: int, elem_size: int) -> int:
    rows = max(1, _CHUNK_BYTES // max(1, n_cols * elem_size))
    rows = 1 << (rows.bit_length() - 1)  # a power of two keeps matmul shapes tidy
    return max(1, min(n_rows, rows))


def _ce_rows(logits, targets, loss_rows, n_counted, n_classes, ignore_index, compute_grad,
             grad_scale, lse_parts=None):
    """Fills loss_rows for the chunk; if compute_grad, logits becomes
    grad_scale * dloss/dlogits. lse_parts: the logits matmul's (max, sum) pieces
    of each row's log-sum-exp, so the logits are read once."""
    n_rows, n_cols = logits.shape
    max_block, num_warps = pick(gpu=_ROW_TILE_GPU, interpreter=_ROW_TILE_INTERPRETER)
    part_max, part_sum = lse_parts if lse_parts is not None else (loss_rows, loss_rows)
    n_parts = part_max.shape[1] if lse_parts is not None else 1
    _ce_fwd_grad_kernel[(n_rows,)](
        logits, logits.stride(0),
        targets, loss_rows, n_counted, part_max, part_sum,
        part_max.stride(0) if lse_parts is not None else 0, n_parts,
        n_cols, n_classes, ignore_index, grad_scale,
        COMPUTE_GRAD=compute_grad, LSE_FROM_PARTS=lse_parts is not None,
        BLOCK_V=min(max_block, triton.next_power_of_2(n_cols)),
        BLOCK_P=max(_MIN_BLOCK_P, triton.next_power_of_2(n_parts)), num_warps=num_warps,
    )


def _chunk_logits(xc, w_compute, num_classes, one_pass):
    """The chunk's logits, and with one_pass the pieces of their rows'
    log-sum-exp, taken in the logits matmul's epilogue."""
    if not one_pass:
        return torch.mm(xc, w_compute.t()), None
    n_parts = triton.cdiv(w_compute.shape[0], lse_block_n())
    parts = [torch.empty((xc.shape[0], n_parts), device=xc.device, dtype=torch.float32) for _ in range(2)]
    logits = matmul(xc, w_compute.t(), xc.dtype, epilogue=EPILOGUE_LSE, lse=parts,
                    n_valid_cols=num_classes)
    return logits, parts


def _gemm_into(out, a, b, *, accumulate):
    """out = a @ b, or out += a @ b, as one GEMM writing out's dtype. With fp32
    `out` and 16-bit a, b the products are accumulated and stored in fp32
    (cuBLAS's fp32-output GEMM, beta = 1 to accumulate): never rounded to 16 bits."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    # Tried on every device: CUDA has these GEMMs, a CPU build of torch 2.13 does
    # not (NotImplementedError), and the shape-only recorders of bench.anatomy
    # (fake tensors, meta kernels) then count the GPU's path, not the upcasts below.
    # Each refusal is a host-side dispatch or dtype check, raised before any launch.
    with contextlib.suppress(RuntimeError, TypeError):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
        return
    with contextlib.suppress(RuntimeError, TypeError):
        # A torch whose addmm takes no fp32 `self` with 16-bit operands: the
        # fp32-output GEMM (torch >= 2.8), then one add.
        product = torch.mm(a, b, out_dtype=out.dtype)
        if accumulate:
            out.add_(product)
        else:
            out.copy_(product)
        return
    # A CPU (the interpreter's tests), or a torch without fp32-output GEMMs: upcast.
    a, b = a.float(), b.float()
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def _linear_ce_forward(x2, weight, targets, ignore_index, num_classes, chunk_rows,
                       compute_dx, compute_dw, *, compute_weight=None, grad_scale=1.0, dw_into=None,
                       one_pass=True):
    """Returns (loss fp32 scalar, dx or None, dweight or None), gradients for an
    upstream gradient of grad_scale. The matmuls run in x2's dtype; dweight comes
    in weight's, or is added into dw_into (then None is returned for it)."""
    n, c = x2.shape
    v = weight.shape[0]
    device = x2.device
    # The matmuls' copy of the weight: the caller's, or what autocast would make,
    # once per call.
    w_compute = compute_copy(weight, compute_weight, x2.dtype)
    loss_rows = torch.empty(n, device=device, dtype=torch.float32)
    n_counted = (targets != ignore_index).sum()
    compute_grad = compute_dx or compute_dw
    dx = torch.empty((n, c), device=device, dtype=x2.dtype) if compute_dx else None
    if chunk_rows is None:
        chunk_rows = _default_chunk_rows(n, v, x2.element_size())
    n_chunks = triton.cdiv(n, chunk_rows)
    dw = dw_acc = None
    if compute_dw and dw_into is not None:
        dw_acc = dw_into
    elif compute_dw:
        dw = torch.empty((v, c), device=device, dtype=weight.dtype)
        # The GEMMs write dW directly when it is fp32, or when one chunk's GEMM
        # in x's dtype is all there is. Otherwise an fp32 accumulator takes the
        # chunks' sum (16-bit partial sums would each be rounded), rounded once
        # to the weight's dtype at the end.
        direct = weight.dtype == torch.float32 or (weight.dtype == x2.dtype and n_chunks == 1)
        dw_acc = dw if direct else torch.empty((v, c), device=device, dtype=torch.float32)

    for i, start in enumerate(range(0, n, chunk_rows)):
        end = min(n, start + chunk_rows)
        xc = x2[start:end]
        logits, lse_parts = _chunk_logits(xc, w_compute, num_classes, one_pass)
        _ce_rows(logits, targets[start:end], loss_rows[start:end], n_counted,
                 num_classes, ignore_index, compute_grad, grad_scale, lse_parts)
        if compute_dx:
            torch.mm(logits, w_compute, out=dx[start:end])
        if compute_dw:
            _gemm_into(dw_acc, logits.t(), xc, accumulate=i > 0 or dw_into is not None)
        del logits
    if dw is not None and dw_acc is not dw:
        dw.copy_(dw_acc)
    loss = loss_rows.sum() / n_counted.clamp(min=1).to(torch.float32)
    return loss, dx, dw


# ----------------------------------------------------------------------------- autograd


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, num_classes, chunk_rows, compute_dx, compute_dw,
                compute_weight, grad_output, accumulate_grad, one_pass):
        x2 = x.reshape(-1, x.shape[-1])
        loss, dx, dw = _linear_ce_forward(
            x2, weight, targets, ignore_index, num_classes, chunk_rows, compute_dx, compute_dw,
            compute_weight=compute_weight, grad_scale=1.0 if grad_output is None else grad_output,
            dw_into=grad_buffer(weight, accumulate_grad), one_pass=one_pass)
        # The gradients are our own buffers, never inputs; backward scales them
        # out of place so a retained graph can run backward twice.
        ctx.x_shape = x.shape
        ctx.scaled = grad_output is not None
        ctx.save_for_backward(dx, dw)
        return loss

    @staticmethod
    @once_differentiable("linear_cross_entropy")
    def backward(ctx, grad_out):
        dx_saved, dw_saved = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0] and dx_saved is not None:
            # With grad_output given, the gradients were taken for it already.
            dx = (dx_saved if ctx.scaled else dx_saved * grad_out.to(dx_saved.dtype)).view(ctx.x_shape)
        if ctx.needs_input_grad[1] and dw_saved is not None:
            dw = dw_saved if ctx.scaled else dw_saved * grad_out.to(dw_saved.dtype)
        return dx, dw, None, None, None, None, None, None, None, None, None, None


def _linear_cross_entropy(x, weight, targets, ignore_index, num_classes, check_targets,
                          chunk_rows=None, *, compute_weight=None, grad_output=None,
                          accumulate_grad=False, one_pass=True):
    """linear_cross_entropy after its argument checks; `chunk_rows` (rows per
    chunk, default: as many as keep a chunk's logits within _CHUNK_BYTES)
    lets tests cross chunk boundaries at small sizes."""
    n = x.numel() // x.shape[-1]
    targets = targets.reshape(-1)
    capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if check_targets and n and not capturing:
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise IndexError(f"linear_cross_entropy: targets contains {first}, outside "
                             f"[0, {num_classes}) and not ignore_index ({ignore_index})")
    grad_on = torch.is_grad_enabled()
    compute_dx = grad_on and x.requires_grad
    compute_dw = grad_on and weight.requires_grad
    if n == 0:
        # Nothing counts: loss 0 with zero gradients, as when every target is ignored.
        return (x.sum() * 0 + weight.sum() * 0).float()
    # The matmuls run in x's dtype, whatever autocast would choose.
    with on_device(x), torch.autocast(x.device.type, enabled=False):
        return _LinearCrossEntropy.apply(x, weight, targets.contiguous(), ignore_index, num_classes,
                                         chunk_rows, compute_dx, compute_dw, compute_weight,
                                         grad_output, accumulate_grad, one_pass)


# ----------------------------------------------------------------------------- public


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, num_classes: int | None = None,
                         check_targets: bool = True, *, compute_weight: torch.Tensor | None = None,
                         grad_output: float | None = None, accumulate_grad: bool = False,
                         one_pass: bool = True) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ weight.T, without holding them all.

    Args:
        x: (..., C) float32/float16/bfloat16 hidden states (leading dims are
            flattened to N rows). The matmuls run in x's dtype (autocast does
            not change it).
        weight: (V, C), float32/float16/bfloat16 in its own dtype (e.g. the
            fp32 master copy of the tied embedding with bf16 x: it is converted
            to x's dtype for the matmuls once per call, as autocast would); rows
            beyond num_classes are padding.
        targets: (...) or (N,), int64 or int32 class indices; entries equal to
            ignore_index do not count.
        ignore_index: target value that is skipped (default -100), an int64.
        num_classes: the number of real classes (default V). Logit columns
            >= num_classes are excluded from the softmax and the matching weight
            rows get a zero gradient.
        check_targets: a bool; reject targets outside [0, num_classes) that are not
            ignore_index (IndexError, as F.cross_entropy raises on the CPU). This
            costs one device reduction and a host sync; it is
            skipped automatically while a CUDA graph is being captured. With the
            check off, such targets give a meaningless loss (but no bad memory access).
        compute_weight: None, or weight already converted to x's dtype (V, C),
            read instead of converting weight once per call; it must hold weight's
            values rounded to x's dtype.
        grad_output: None, or the gradient the backward will receive for the
            loss, known in advance (the training step's 1 / accumulation steps):
            the gradients are then taken for it during the forward and the
            backward returns them without reading what arrives, which must be
            this value.
        accumulate_grad: add weight's gradient into its existing `.grad` during
            the forward (in the dW matmuls, fp32, beta = 1) instead of returning
            it to autograd; needs grad_output. gpt2_kernels/linear.py says when
            delivering a gradient this way applies.
        one_pass: the logits matmul (Triton) also takes each row's log-sum-exp
            pieces in its epilogue, so the loss kernel reads the logits once and
            writes their gradient once; False takes them from cuBLAS and reads
            them twice (the earlier path, kept to measure against).

    Returns:
        A float32 scalar equal, in value and in the gradients for x and weight, to
        ``F.cross_entropy((x @ weight.to(x.dtype).T)[..., :num_classes].float().flatten(0, -2),
        targets.flatten(), ignore_index=ignore_index)``: logits in x's dtype,
        softmax in float32. dx comes in x's dtype; dweight in weight's dtype,
        accumulated in fp32 over the row chunks (an fp32 weight's gradient is
        never rounded to 16 bits). When no target counts (all ignored, or
        N == 0) the loss is 0.0 and the gradients are zero, where PyTorch
        returns nan. The gradient is computed during the forward pass when x or
        weight requires grad, so backward is two elementwise scalings (none with
        grad_output); it is once-differentiable: a gradient through it taken
        with create_graph=True (double backward) raises (PyTorch's ops allow it).
    """
    op = "linear_cross_entropy"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_dim=1, layout="(..., C)")
    check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES, dim=2, layout="(V, C)")
    check_tensor(op, "targets", targets, dtypes=_TARGET_DTYPES)
    check_same_device(op, x=x, weight=weight, targets=targets)
    v, c = weight.shape
    if v == 0 or c == 0:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}; V and C must be positive")
    if x.shape[-1] != c:
        raise ValueError(f"{op}: x has {x.shape[-1]} features but weight has {c} (weight is (V, C))")
    n = math.prod(x.shape[:-1])
    if tuple(targets.shape) not in (tuple(x.shape[:-1]), (n,)):
        raise ValueError(f"{op}: targets has shape {tuple(targets.shape)}; expected "
                         f"{tuple(x.shape[:-1])} or ({n},) to match x {tuple(x.shape)}")
    if num_classes is None:
        num_classes = v
    num_classes = check_int(op, "num_classes", num_classes, at_least=1, at_most=v)
    # Compared with int64 targets on the device: it must be an int64 itself.
    ignore_index = check_int(op, "ignore_index", ignore_index, at_least=-2**63, at_most=2**63 - 1)
    check_bool(op, "check_targets", check_targets)
    check_bool(op, "accumulate_grad", accumulate_grad)
    check_bool(op, "one_pass", one_pass)
    check_compute_weight(op, "compute_weight", compute_weight, weight, x)
    check_same_device(op, x=x, compute_weight=compute_weight)
    if grad_output is not None:
        check_real(op, "grad_output", grad_output)
    if accumulate_grad and grad_output is None:
        raise ValueError(f"{op}: accumulate_grad needs grad_output: the weight's gradient is added "
                         "during the forward, so the backward's gradient must be known then")
    return _linear_cross_entropy(x, weight, targets, ignore_index, num_classes, check_targets,
                                 compute_weight=compute_weight,
                                 grad_output=None if grad_output is None else float(grad_output),
                                 accumulate_grad=accumulate_grad, one_pass=one_pass)
