"""Fused AdamW: every parameter of a group updated by one Triton launch.

Math, per element at step t, in torch.optim.AdamW's order (g the gradient, all
arithmetic in fp32, bias corrections in fp64):

    p <- p * (1 - lr * weight_decay)
    m <- m + (1 - beta1) * (g - m)
    v <- beta2 * v + (1 - beta2) * g^2
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Layout. Each group owns two flat float32 buffers (exp_avg, exp_avg_sq) and a
float32 step counter per parameter; the per-parameter optimizer state that
`state_dict()` exposes ('step', 'exp_avg', 'exp_avg_sq', torch.optim.AdamW's
format) is made of views into them. Parameters and gradients stay where they
are: the kernel reads where they are from a small int64 table (see _COL_*), and
a block map sends each program of a 1-D grid to its parameter, so a group of any
shapes is one launch with no empty programs.

Vectorized access (16-byte loads/stores) needs alignment the compiler can see.
Each parameter's slice of the moment buffers starts at a multiple of
_STATE_ALIGN elements (a little padding between slices). Param and grad
positions are stored twice: as raw addresses, and, where the host checked that
the param, its grad and the base pointer p_like_ptr are all 16-byte aligned, as
element offsets from p_like_ptr, which are then multiples of 16 bytes. The
first numel rounded down to a multiple of 16 bytes of elements of an aligned
parameter take a vector path with tl.multiple_of hints on those offsets and on
that bound (so that its mask is constant over each 16 bytes); the few elements
left and all of an unaligned parameter take the scalar path through the raw
addresses, with no hints. A hint is only ever given where the host established
it, since a false one would silently corrupt results.

Gradients: `zero_grad(set_to_none=False)` makes the parameters' .grad views of
one flat buffer per (device, dtype), so zeroing them all is one launch.

Capturable by design: the learning rate and the step counters live in device
tensors that the kernel reads, bias corrections are computed on the device,
and `step()` reads nothing back from the device, so a CUDA graph can capture it.

DTensor parameters (FSDP2 shards them over processes): `ShardedFusedAdamW`
hands each process's local shards and their gradients to a FusedAdamW and shows
its state as DTensors laid out like the parameters (views of the same flat
buffers), which torch.distributed.checkpoint saves and reshards.
"""
import collections
import numbers
import struct

import torch
import triton
import triton.language as tl

from gpt2_kernels._common import check_same_device, dtype_name, on_device, pick, round_to

# Columns of the per-parameter table (int64). p_off/g_off: param and grad
# positions in ELEMENTS relative to the kernel's p_like_ptr argument, valid (and
# multiples of 16 bytes) only where vec_numel > 0, else 0. p_addr/g_addr: raw
# addresses, always valid (the scalar path). state_off: offset into the flat
# moment buffers, a multiple of _STATE_ALIGN. first_block: the parameter's first
# program. slot: index of its step counter. vec_numel: numel rounded down to a
# multiple of 16 bytes' worth of elements where the param, its grad and
# p_like_ptr are all 16-byte aligned (else 0); those elements take the vector path.
_COL_P_OFF = tl.constexpr(0)
_COL_G_OFF = tl.constexpr(1)
_COL_P_ADDR = tl.constexpr(2)
_COL_G_ADDR = tl.constexpr(3)
_COL_NUMEL = tl.constexpr(4)
_COL_STATE = tl.constexpr(5)
_COL_FIRST = tl.constexpr(6)
_COL_SLOT = tl.constexpr(7)
_COL_VEC_NUMEL = tl.constexpr(8)
_COL_COPY = tl.constexpr(9)  # 1: also write the updated value, rounded to bf16, into the group's copies
_TABLE_W = 10
# Bytes of a vector access, and the alignment (in elements) of each parameter's
# slice of the moment buffers and of the flat gradient buffer: 16 elements, 64
# bytes of fp32 state.
_VEC_BYTES = 16
_STATE_ALIGN = 16
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
# (BLOCK, num_warps) of the update. No autotune: the kernel updates its operands
# in place. Small blocks under the interpreter make tests span several blocks
# per parameter.
_UPDATE_TILE_GPU = (2048, 8)
_UPDATE_TILE_INTERPRETER = (128, 1)


@triton.jit
def _pow_by_squaring(base, n):
    """base ** n in float64 for an int64 n >= 0 (square-and-multiply, log2(n) rounds)."""
    result = tl.full((), 1.0, tl.float64)
    while n > 0:
        result = tl.where((n & 1) != 0, result * base, result)
        base = base * base
        n = n >> 1
    return result


@triton.jit
def _adamw_update(p_ptrs, g_ptrs, m_ptrs, v_ptrs, mask, lr, step_size, bias_correction2_sqrt,
                  beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, c_ptrs, write_copy):
    """One tile of the update, where `mask` is true; with write_copy, the new
    value rounded to bf16 goes to c_ptrs too."""
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)

    # Same operation order as torch.optim.AdamW's single-tensor path.
    p = p * (1.0 - lr * weight_decay)
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)

    tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=mask)
    tl.store(m_ptrs, m, mask=mask)
    tl.store(v_ptrs, v, mask=mask)
    if write_copy:
        tl.store(c_ptrs, round_to(p, tl.bfloat16), mask=mask)


@triton.jit
def _adamw_kernel(
    table_ptr, block_param_ptr,
    exp_avg_ptr, exp_avg_sq_ptr, steps_ptr, lr_ptr,
    p_like_ptr, found_inf_ptr, copies_ptr,
    beta1, beta1_lo, beta2, beta2_lo, one_minus_beta1, one_minus_beta2,
    eps, weight_decay,
    TABLE_W: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, STATE_ALIGN: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, HAS_COPIES: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table_ptr + tl.load(block_param_ptr + pid) * TABLE_W
    numel = tl.load(row + _COL_NUMEL)
    first_block = tl.load(row + _COL_FIRST)
    slot = tl.load(row + _COL_SLOT)
    vec_numel = tl.load(row + _COL_VEC_NUMEL)  # elements [0, vec_numel) take the vector path
    # The bf16 copies share the moments' layout: a parameter's copy starts at its state offset.
    write_copy = False
    if HAS_COPIES:
        write_copy = tl.load(row + _COL_COPY) != 0

    block_start = (pid - first_block).to(tl.int64) * BLOCK
    # A step flagged non-finite (found_inf != 0, set on the device) updates nothing.
    if HAS_FOUND_INF:
        run = tl.load(found_inf_ptr) == 0.0
    else:
        run = block_start >= 0

    # Bias corrections 1 - beta**step in float64: in float32, 1 - 0.999**1 loses
    # four digits to cancellation. The betas arrive as float32 hi + lo pairs
    # because scalar kernel arguments are float32.
    step = tl.load(steps_ptr + slot)
    n = step.to(tl.int64)
    zero64 = tl.full((), 0.0, tl.float64)
    b1 = (zero64 + beta1) + beta1_lo
    b2 = (zero64 + beta2) + beta2_lo
    bias_correction1 = 1.0 - _pow_by_squaring(b1, n)
    bias_correction2 = 1.0 - _pow_by_squaring(b2, n)
    lr = tl.load(lr_ptr)
    step_size = (lr.to(tl.float64) / bias_correction1).to(tl.float32)
    bias_correction2_sqrt = tl.sqrt_rn(bias_correction2.to(tl.float32))

    if (block_start < vec_numel) & run:
        # Vector path. vec_numel > 0 only where the host found the param, its grad
        # and p_like_ptr 16-byte aligned: their element offsets from p_like_ptr are
        # then multiples of VEC (16 bytes), vec_numel is numel rounded down to a
        # multiple of VEC, and state offsets are multiples of STATE_ALIGN by
        # construction, so these hints are true. They are loaded here, inside the
        # branch, because a hint attaches to the op that defines its value and
        # must not reach the scalar path below.
        p_off = tl.multiple_of(tl.load(row + _COL_P_OFF), VEC)
        g_off = tl.multiple_of(tl.load(row + _COL_G_OFF), VEC)
        state_off = tl.multiple_of(tl.load(row + _COL_STATE), STATE_ALIGN)
        vec_end = tl.multiple_of(tl.load(row + _COL_VEC_NUMEL), VEC)
        offs = block_start + tl.arange(0, BLOCK)
        _adamw_update(p_like_ptr + p_off + offs, p_like_ptr + g_off + offs,
                      exp_avg_ptr + state_off + offs, exp_avg_sq_ptr + state_off + offs,
                      offs < vec_end, lr, step_size, bias_correction2_sqrt,
                      beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
                      copies_ptr + state_off + offs, write_copy)
    if (vec_numel < numel) & (block_start + BLOCK > vec_numel) & run:
        # Scalar path, elements [vec_numel, numel) of this tile: all of an
        # unaligned parameter (vec_numel = 0), or the last numel % VEC of an
        # aligned one. Pointers from the raw addresses, no hints.
        # Params and grads share the group's dtype (torch guarantees grad.dtype == param.dtype).
        elem_ptr_ty = tl.pointer_type(p_like_ptr.dtype.element_ty)
        p_ptr = tl.load(row + _COL_P_ADDR).to(elem_ptr_ty)
        g_ptr = tl.load(row + _COL_G_ADDR).to(elem_ptr_ty)
        state_off = tl.load(row + _COL_STATE)
        offs = block_start + tl.arange(0, BLOCK)
        _adamw_update(p_ptr + offs, g_ptr + offs,
                      exp_avg_ptr + state_off + offs, exp_avg_sq_ptr + state_off + offs,
                      (offs >= vec_numel) & (offs < numel), lr, step_size, bias_correction2_sqrt,
                      beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
                      copies_ptr + state_off + offs, write_copy)


def _split_f64(x: float):
    """x as float32 hi + lo, so a float32 kernel argument pair carries ~48 bits."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


class _GroupBuffers:
    """Device state of one param group: flat moments, step counters, lr, the launch table."""

    def __init__(self, params, device, dtype):
        self.device = device
        self.dtype = dtype
        # What the state was built for: step() refuses a parameter that no longer fits it.
        self.shapes = [tuple(p.shape) for p in params]
        # Each slice starts at a multiple of _STATE_ALIGN elements (the kernel's hint).
        self.offsets, total = _aligned_offsets([p.numel() for p in params])
        self.exp_avg = torch.zeros(total, device=device, dtype=torch.float32)
        self.exp_avg_sq = torch.zeros(total, device=device, dtype=torch.float32)
        # float32 like torch.optim.AdamW's 'step' tensors; exact up to 2**24 steps.
        self.steps = torch.zeros(len(params), device=device, dtype=torch.float32)
        self.lr = torch.zeros((), device=device, dtype=torch.float32)
        self.lr_value = None  # the float last written into self.lr
        # bf16 copies of some parameters (bf16_copies()), laid out as the moments;
        # `copied` holds the slots whose copy each step writes.
        self.copies = None
        self.copied = frozenset()
        self.key = None  # identifies the table below: (slot, param addr, grad addr) of active params
        self.table = None
        self.base_slot = None  # the parameter passed as p_like_ptr, which p_off/g_off are relative to
        self.slots = None  # identifies block_param / active_mask / first_blocks
        self.first_blocks = []
        self.block_param = None
        self.active_mask = None
        self.n_blocks = 0

    def state_views(self, slot, p):
        off, n = self.offsets[slot], p.numel()
        return {
            "step": self.steps[slot],
            "exp_avg": self.exp_avg[off:off + n].view(p.shape),
            "exp_avg_sq": self.exp_avg_sq[off:off + n].view(p.shape),
        }

    def _to_device(self, host):
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def refresh(self, key, params, block):
        """Rebuild the launch table after the set of parameters with gradients,
        or their addresses, changed. The block map (one int64 per program)
        depends only on the set, so a change of addresses alone costs one
        host-to-device copy of n_active x 6 int64."""
        slots = tuple(k[0] for k in key)
        if slots != self.slots:
            counts = torch.tensor([triton.cdiv(params[s].numel(), block) for s in slots],
                                  dtype=torch.int64)
            self.first_blocks = (torch.cumsum(counts, 0) - counts).tolist()
            self.n_blocks = int(counts.sum())
            self.block_param = self._to_device(
                torch.repeat_interleave(torch.arange(len(slots), dtype=torch.int64), counts))
            mask = torch.zeros(len(params), dtype=torch.float32)
            mask[list(slots)] = 1.0
            self.active_mask = self._to_device(mask)
            self.slots = slots
        rows, self.base_slot = _table_rows(key, params, self.offsets, self.first_blocks, self.copied)
        self.table = self._to_device(torch.tensor(rows, dtype=torch.int64).reshape(-1))
        self.key = key


def _aligned_offsets(sizes):
    """Offsets of consecutive slices of `sizes` elements, each starting at a
    multiple of _STATE_ALIGN elements, and the total length."""
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += triton.cdiv(size, _STATE_ALIGN) * _STATE_ALIGN
    return offsets, total


class _FlatGradients:
    """One flat buffer per (device, dtype) that the parameters' .grad are views
    of, so that zeroing every gradient is one launch per buffer (one for a model
    in one dtype). Autograd accumulates into an existing .grad in place, so the
    views stay the gradients, at fixed addresses (what a CUDA graph needs)."""

    def __init__(self, params):
        buckets = {}
        for p in params:
            buckets.setdefault((p.device, p.dtype), []).append(p)
        self.buffers = []
        self.slices = []  # (param, its flat buffer, offset)
        for (device, dtype), members in buckets.items():
            offsets, total = _aligned_offsets([p.numel() for p in members])
            flat = torch.zeros(total, device=device, dtype=dtype)
            self.buffers.append(flat)
            self.slices += [(p, flat, off) for p, off in zip(members, offsets)]
        self.views = [self._view(p, flat, off) for p, flat, off in self.slices]

    @staticmethod
    def _view(p, flat, off):
        return flat[off:off + p.numel()].view(p.shape)

    def zero(self):
        """Zero every gradient: one launch per buffer. A parameter whose .grad
        is no longer its view of the buffer -- another tensor assigned to
        p.grad, or the view's storage swapped by `p.grad.data = t` -- gets a
        fresh (zeroed) view back, so no stale gradient survives; one without a
        gradient keeps None, as torch's zero_grad(set_to_none=False) does."""
        for flat in self.buffers:
            flat.zero_()
        for i, (p, flat, off) in enumerate(self.slices):
            g, view = p.grad, self.views[i]
            address = flat.data_ptr() + off * flat.element_size()
            if g is None or (g is view and g.data_ptr() == address):
                continue
            if view.data_ptr() != address:
                view = self.views[i] = self._view(p, flat, off)
            p.grad = view


def _table_rows(key, params, offsets, first_blocks, copied=frozenset()):
    """The launch table's rows (columns _COL_*) for the active params in `key`,
    and the slot of the parameter to pass as the kernel's p_like_ptr.

    The base is the first active parameter whose address is 16-byte aligned (so
    that Triton's specialisation marks p_like_ptr divisible by 16); it is part of
    `key`, so a change of its address rebuilds this table. A row is aligned
    only when its param and grad addresses are 16-byte aligned and so is the
    base: then (addr - base) is a multiple of 16 bytes, its element offset is
    exact and a multiple of 16 // element_size, and vec_numel (numel rounded
    down to such a multiple) is > 0 -- what the kernel's hints claim. Other
    rows have vec_numel = 0: the scalar path only."""
    esize = params[key[0][0]].element_size()
    base_slot, base_addr = key[0][0], None
    for slot, p_addr, _ in key:
        if p_addr % _VEC_BYTES == 0 and params[slot].numel() > 0:  # an empty one may be null
            base_slot, base_addr = slot, p_addr
            break
    vec = _VEC_BYTES // esize
    rows = []
    for (slot, p_addr, g_addr), first in zip(key, first_blocks):
        numel = params[slot].numel()
        aligned = (base_addr is not None and p_addr % _VEC_BYTES == 0
                   and g_addr % _VEC_BYTES == 0)
        vec_numel = numel // vec * vec if aligned else 0
        p_off = g_off = 0
        if vec_numel > 0:
            p_off, g_off = (p_addr - base_addr) // esize, (g_addr - base_addr) // esize
            assert (base_addr + p_off * esize == p_addr and base_addr + g_off * esize == g_addr
                    and p_off % vec == 0 and g_off % vec == 0)
        assert offsets[slot] % _STATE_ALIGN == 0 and vec_numel % vec == 0
        rows.append([p_off, g_off, p_addr, g_addr, numel, offsets[slot], first, slot, vec_numel,
                     int(slot in copied)])
    return rows, base_slot


def _describe(t, shape=None, dtype=None, device=None) -> str:
    if t is not None:
        shape, dtype, device = tuple(t.shape), t.dtype, t.device
    return f"{tuple(shape)} {str(dtype).replace('torch.', '')} on {device}"


def _refuse_repeated_params(param_group, existing_groups):
    """A parameter listed twice (in this group or an earlier one), or two that
    share memory, would be updated twice per step: refuse it."""
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
        params = [params]
    elif not isinstance(params, (list, tuple, set)):
        params = param_group["params"] = list(params)  # a generator is read once, here
    seen = {id(p): (g, i) for g, group in enumerate(existing_groups)
            for i, p in enumerate(group["params"])}
    spans = {}  # device -> [(start, end, where)]
    for g, group in enumerate(existing_groups):
        for i, p in enumerate(group["params"]):
            _add_span(spans, p, f"parameter {i} of group {g}")
    new_group = len(existing_groups)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            continue  # torch's own add_param_group says what is wrong with it
        if id(p) in seen:
            g, j = seen[id(p)]
            where = "of this group" if g == new_group else f"of group {g}"
            raise ValueError(f"FusedAdamW: parameter {i} of group {new_group} is listed twice "
                             f"(it is also parameter {j} {where}); list each parameter once")
        seen[id(p)] = (new_group, i)
        _add_span(spans, p, f"parameter {i} of group {new_group}")
    for device_spans in spans.values():
        device_spans.sort()
        for (start_a, end_a, a), (start_b, _, b) in zip(device_spans, device_spans[1:]):
            if start_b < end_a:
                raise ValueError(f"FusedAdamW: {a} and {b} share memory; each would be updated "
                                 "through the other: give the optimizer each tensor once")


def _add_span(spans, p, where):
    if p.numel() and p.device.type != "meta":
        start = p.data_ptr()
        spans.setdefault(p.device, []).append((start, start + p.numel() * p.element_size(), where))


def _as_float(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else value


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _validate_hyper(lr, betas, eps, weight_decay):
    """torch.optim.AdamW's checks, plus the types the launch takes: lr a real
    number or a one-element floating tensor (read on the device at every step);
    betas, eps and weight_decay real numbers, since they are kernel arguments
    fixed at launch (and baked into a captured graph)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"FusedAdamW: a Tensor lr must hold one floating-point value, got "
                             f"{_describe(lr)}")
        lr_value = lr.item()
    elif _is_real(lr):
        lr_value = lr
    else:
        raise TypeError(f"FusedAdamW: lr must be a number or a one-element Tensor, got {type(lr).__name__}")
    if not 0.0 <= lr_value:
        raise ValueError(f"Invalid learning rate: {lr_value}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; expected two values")
    for name, value in (("betas[0]", betas[0]), ("betas[1]", betas[1]), ("eps", eps),
                        ("weight_decay", weight_decay)):
        if not _is_real(value):
            raise TypeError(f"FusedAdamW: {name} must be a real number, got {type(value).__name__} "
                            "(betas, eps and weight_decay are fixed per launch; only lr may be a Tensor)")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _found_inf_flag(found_inf, device):
    """The device flag step() reads for optimizer.found_inf: a tensor of one
    element (as GradScaler sets it), copied to the parameters' device as
    float32; a Python number is decided on the host instead (True: skip)."""
    if isinstance(found_inf, torch.Tensor):
        if found_inf.numel() != 1:
            raise ValueError(f"FusedAdamW: found_inf must hold one value, got {_describe(found_inf)}")
        return found_inf.to(device, torch.float32).reshape(())
    if isinstance(found_inf, numbers.Real):
        return found_inf != 0  # NaN != 0 too: anything but an exact 0 skips
    raise TypeError(f"FusedAdamW: found_inf must be a one-element tensor or a number, got "
                    f"{type(found_inf).__name__}")


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) in one Triton launch per group.

    Args mirror torch.optim.AdamW: params, lr=1e-3, betas=(0.9, 0.999),
    eps=1e-8, weight_decay=1e-2 (no amsgrad, no maximize).

    - Parameters of a group must share one device and one dtype (float32 or
      bfloat16) and be contiguous; each is listed once, in one group, and no
      two share memory. Moments are always float32. bfloat16 parameters are
      updated in float32 and rounded back to bfloat16 each step: there is NO
      float32 master copy (keep the model in float32 under autocast if updates
      smaller than a bf16 ulp matter).
    - The state is built for each parameter's shape, dtype and device:
      ``step()`` refuses a parameter whose shape, dtype or device changed since
      (build a new optimizer for it), instead of updating the wrong memory.
    - Parameters whose .grad is None are skipped that step (their step counter
      does not advance), as in torch. Changing which parameters have gradients,
      or their gradients' addresses, rebuilds the group's launch table: a host
      loop over the group and one small host-to-device copy.
    - ``zero_grad(set_to_none=False)`` zeroes every gradient in one launch:
      the first such call makes the gradients views of one flat buffer per
      (device, dtype), which autograd then accumulates into in place, so their
      addresses never change (what a CUDA graph needs). A gradient replaced
      since (``p.grad = t``, ``p.grad.data = t``, a hook) is used by ``step()``
      as it is, and the next such ``zero_grad`` gives the parameter its zeroed
      view back. ``zero_grad()`` (or ``set_to_none=True``) sets them to None,
      as torch does, and drops that buffer.
    - Capturable: ``step()`` reads nothing from the device. The learning rate is
      copied from ``group["lr"]`` into a device tensor: a Python float with
      ``fill_`` whenever it changed (so schedulers work), a one-element tensor
      (as torch.optim.AdamW takes it) at every step, so changing it in place
      works too. While a CUDA graph is being captured a float lr is not copied:
      you change the lr of a captured step by calling ``set_lr()`` (or
      ``sync_lr()`` after a scheduler) before replaying. Run one eager step (and
      one ``zero_grad(set_to_none=False)``) before capturing: it compiles the
      kernel and builds the table and the flat gradients. betas, eps and
      weight_decay must be real numbers (tensors are refused at construction:
      they are kernel arguments, baked into a captured graph).
    - ``state_dict()``/``load_state_dict()`` use torch.optim.AdamW's format
      ('step', 'exp_avg', 'exp_avg_sq' per parameter) so either optimizer can
      resume from the other's checkpoint. As in torch, the state dict holds
      references to the live state tensors (views into the flat buffers).
    - Skipping on the device: while ``optimizer.found_inf`` is set to a
      one-element tensor (as torch's GradScaler sets it for torch's fused AdamW),
      ``step()`` leaves weights, moments and step counts untouched unless it is
      exactly 0 (any other value, NaN included, skips), with no host sync (the
      training step uses it for non-finite steps). A Python number is accepted
      and decided on the host.
    - ``copy.deepcopy`` and pickling give an independent optimizer with the same
      state (the flat buffers are rebuilt around it).
    """

    supports_found_inf = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        _validate_hyper(lr, betas, eps, weight_decay)
        self._group_buffers = []
        self._flat_grads = None
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # -- construction -----------------------------------------------------------------
    def __setstate__(self, state):
        # Pickling (and deepcopy) keeps torch's part: defaults, param_groups and the
        # per-parameter state. The flat buffers that state was made of are rebuilt
        # here and the restored values copied into them.
        super().__setstate__(state)
        restored, self.state = self.state, collections.defaultdict(dict)
        self._group_buffers, self._flat_grads = [], None
        for group in self.param_groups:
            buffers = self._build_buffers(group)
            for p in group["params"]:
                for name, value in self.state[p].items():
                    value.copy_(restored[p][name])
            self._group_buffers.append(buffers)

    def add_param_group(self, param_group):
        _refuse_repeated_params(param_group, self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            self._group_buffers.append(self._build_buffers(group))
        except Exception:
            self.param_groups.pop()
            raise
        self._flat_grads = None  # rebuilt over every group by the next zero_grad

    def _build_buffers(self, group):
        params = group["params"]
        if not params:
            raise ValueError("FusedAdamW: a parameter group has no parameters")
        check_same_device("FusedAdamW", **{f"parameter {i}": p for i, p in enumerate(params)})
        device, dtype = params[0].device, params[0].dtype
        for i, p in enumerate(params):
            if p.dtype != dtype:
                raise TypeError(f"FusedAdamW: parameter {i} of a group has dtype {p.dtype} but "
                                f"parameter 0 has {dtype}; put different dtypes in different groups")
            if not p.is_contiguous():
                raise ValueError(f"FusedAdamW: parameter {i} of a group is not contiguous")
        if dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"FusedAdamW: parameters have dtype {dtype}; supported: float32, bfloat16")
        buffers = _GroupBuffers(params, device, dtype)
        for slot, p in enumerate(params):
            self.state[p] = buffers.state_views(slot, p)
        return buffers

    # -- bf16 copies ---------------------------------------------------------------------
    @torch.no_grad()
    def bf16_copies(self, params) -> list[torch.Tensor]:
        """bf16 copies of float32 parameters of this optimizer, kept by the update.

        Returns one bf16 tensor per parameter, its shape, filled now with
        ``p.to(torch.bfloat16)``; from then on every step() that updates the
        parameter writes its new value, rounded to nearest even exactly as that
        conversion rounds, into the copy in the same kernel (a step skipped by
        found_inf, or a parameter without a gradient, leaves both unchanged).
        What the matmuls of a mixed-precision step read instead of casting the
        fp32 master weights in every micro-step. The copies live at fixed
        addresses (one buffer per group); they are not part of state_dict() and
        load_state_dict() keeps them; a change to a parameter's values outside
        step() (loading weights) must be followed by copying them again. A
        deepcopy or unpickled optimizer keeps no copies (ask it for new ones)."""
        where = {id(p): (i, slot) for i, group in enumerate(self.param_groups)
                 for slot, p in enumerate(group["params"])}
        copies = []
        for p in params:
            if id(p) not in where:
                raise ValueError("FusedAdamW.bf16_copies: a parameter is not one this optimizer updates")
            i, slot = where[id(p)]
            buffers = self._group_buffers[i]
            if buffers.dtype != torch.float32:
                raise TypeError(f"FusedAdamW.bf16_copies: parameter {slot} of group {i} is "
                                f"{dtype_name(buffers.dtype)}; copies are of float32 parameters")
            if buffers.copies is None:
                buffers.copies = torch.zeros_like(buffers.exp_avg, dtype=torch.bfloat16)
            buffers.copied = buffers.copied | {slot}
            buffers.key = None  # the launch table gains the copy flag
            copy = buffers.copies[buffers.offsets[slot]:buffers.offsets[slot] + p.numel()].view(p.shape)
            copies.append(copy.copy_(p))
        return copies

    # -- learning rate ------------------------------------------------------------------
    def set_lr(self, lr, group_index=None):
        """Set group["lr"] (all groups, or one) and its device copy; no host sync.
        Call this outside a captured graph to change the lr its replays use."""
        _validate_hyper(lr, (0.0, 0.0), 0.0, 0.0)
        indices = range(len(self.param_groups)) if group_index is None else [group_index]
        for i in indices:
            self.param_groups[i]["lr"] = lr
            self._push_lr(i)

    def sync_lr(self):
        """Copy every group["lr"] (e.g. set by a scheduler) into the device tensors."""
        for i in range(len(self.param_groups)):
            self._push_lr(i)

    def _push_lr(self, i):
        buffers, lr = self._group_buffers[i], self.param_groups[i]["lr"]
        if isinstance(lr, torch.Tensor):
            # Re-read at every step: schedulers change a tensor lr in place (fill_).
            buffers.lr.copy_(lr.detach().reshape(()))
            buffers.lr_value = None
        elif buffers.lr_value != lr:
            buffers.lr.fill_(lr)
            buffers.lr_value = lr

    # -- gradients ----------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True):
        """set_to_none=True: every .grad becomes None (torch's default). False:
        every gradient is zeroed in one launch per (device, dtype), in place."""
        if set_to_none:
            self._flat_grads = None  # its memory goes back; autograd allocates anew
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        self._refuse_changed_params()
        if self._flat_grads is None:
            self._flat_grads = _FlatGradients([p for g in self.param_groups for p in g["params"]])
        self._flat_grads.zero()

    # -- the update ---------------------------------------------------------------------
    def _refuse_changed_params(self):
        for i, (group, buffers) in enumerate(zip(self.param_groups, self._group_buffers)):
            for slot, p in enumerate(group["params"]):
                built = (buffers.shapes[slot], buffers.dtype, buffers.device)
                if (tuple(p.shape), p.dtype, p.device) != built:
                    raise RuntimeError(
                        f"FusedAdamW: parameter {slot} of group {i} is now {_describe(p)}, but "
                        f"the optimizer's state was built for {_describe(None, *built)}; build a "
                        "new optimizer after changing a parameter's size, dtype or device")
                if not p.is_contiguous():
                    raise RuntimeError(f"FusedAdamW: parameter {slot} of group {i} is no longer "
                                       "contiguous")

    def _active_key(self, group):
        key = []
        for slot, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:
                raise RuntimeError("FusedAdamW does not support sparse gradients")
            if g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
                raise ValueError(f"FusedAdamW: gradient of parameter {slot} is {_describe(g)}, "
                                 f"the parameter {_describe(p)}")
            if not g.is_contiguous():
                raise ValueError(f"FusedAdamW: gradient of parameter {slot} is not contiguous")
            key.append((slot, p.data_ptr(), g.data_ptr()))
        return tuple(key)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refuse_changed_params()
        block, num_warps = pick(gpu=_UPDATE_TILE_GPU, interpreter=_UPDATE_TILE_INTERPRETER)
        # Set by the training step (as torch's GradScaler sets it for torch's fused
        # AdamW): a nonzero value skips this step on the device, step counts included.
        found_inf = getattr(self, "found_inf", None)
        for i, group in enumerate(self.param_groups):
            buffers = self._group_buffers[i]
            flag = None if found_inf is None else _found_inf_flag(found_inf, buffers.device)
            if isinstance(flag, bool):  # a number, decided on the host
                if flag:
                    continue
                flag = None
            key = self._active_key(group)
            if not key:
                continue
            if key != buffers.key:
                buffers.refresh(key, group["params"], block)
            capturing = buffers.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            if not capturing:
                self._push_lr(i)
            if flag is None:
                buffers.steps.add_(buffers.active_mask)
            else:
                # Only an exact 0 runs the step: 2, -1 or NaN must not move the count.
                buffers.steps.addcmul_(buffers.active_mask, flag == 0)
            if buffers.n_blocks == 0:
                continue  # only empty parameters: their steps advanced, nothing else to do
            beta1, beta2 = group["betas"]
            b1_hi, b1_lo = _split_f64(beta1)
            b2_hi, b2_lo = _split_f64(beta2)
            with on_device(group["params"][0]):
                _adamw_kernel[(buffers.n_blocks,)](
                    buffers.table, buffers.block_param,
                    buffers.exp_avg, buffers.exp_avg_sq, buffers.steps, buffers.lr,
                    group["params"][buffers.base_slot], flag if flag is not None else buffers.lr,
                    buffers.copies if buffers.copies is not None else buffers.lr,
                    b1_hi, b1_lo, b2_hi, b2_lo, 1.0 - beta1, 1.0 - beta2,
                    group["eps"], group["weight_decay"],
                    TABLE_W=_TABLE_W, BLOCK=block,
                    VEC=_VEC_BYTES // buffers.dtype.itemsize, STATE_ALIGN=_STATE_ALIGN,
                    HAS_FOUND_INF=flag is not None, HAS_COPIES=bool(buffers.copied),
                    num_warps=num_warps,
                )
        return loss

    # -- checkpoints --------------------------------------------------------------------
    def load_state_dict(self, state_dict):
        """Load a FusedAdamW or torch.optim.AdamW state dict, copying values into
        our float32 buffers (torch's loader would round moments to the param dtype)."""
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, sg in zip(groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't "
                                 "match the size of optimizer's group")
            if sg.get("amsgrad", False) or sg.get("maximize", False):
                raise ValueError("FusedAdamW: the state dict uses amsgrad or maximize, which "
                                 "FusedAdamW does not support")
            if sg.get("decoupled_weight_decay", True) is False and sg.get("weight_decay", 0):
                raise ValueError("FusedAdamW: the state dict is from Adam with L2 weight decay "
                                 "(decoupled_weight_decay=False), not AdamW")
            _validate_hyper(_as_float(sg["lr"]), sg["betas"], sg["eps"], sg["weight_decay"])
        saved_state = state_dict["state"]
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            buffers = self._group_buffers[i]
            for slot, (p, pid) in enumerate(zip(g["params"], sg["params"])):
                views = buffers.state_views(slot, p)
                st = saved_state.get(pid)
                if st is None:
                    for t in views.values():
                        t.zero_()
                    continue
                for name in ("exp_avg", "exp_avg_sq"):
                    value = st[name]
                    if value.numel() != p.numel():
                        raise ValueError(f"FusedAdamW: state '{name}' of parameter {slot} has "
                                         f"{value.numel()} elements, parameter has {p.numel()}")
                    views[name].copy_(value.reshape(p.shape))
                views["step"].copy_(torch.as_tensor(st["step"], dtype=torch.float32))
            for k, v in sg.items():
                if k == "lr":
                    # torch's capturable AdamW saves a tensor lr; ours is a float
                    # that step() copies into the device lr.
                    g[k] = _as_float(v)
                elif k not in ("params", "param_names"):
                    g[k] = tuple(v) if k == "betas" else v
            buffers.lr_value = None  # force the next step to refresh the device lr


# -- DTensor parameters (FSDP2) -------------------------------------------------------


def _local(t):
    """A DTensor's local shard (the tensor itself, not a copy); other tensors as they are."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def _like(state, param):
    """`state`, a tensor shaped like `param`'s local shard, as a DTensor laid out as
    `param` (the same storage: no copy); unchanged when `param` is no DTensor."""
    from torch.distributed.tensor import DTensor
    if not isinstance(param, DTensor):
        return state
    return DTensor.from_local(state, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


class ShardedFusedAdamW(torch.optim.Optimizer):
    """FusedAdamW over DTensor parameters (FSDP2's sharded parameters, torch
    DTensors in general): each process updates its own shard of every parameter
    with FusedAdamW's kernel, on the local tensors, whose numbers then equal
    torch.optim.AdamW's on the same DTensors.

    Same arguments, ``set_lr``, ``found_inf`` and state-dict format as FusedAdamW.
    The state (``exp_avg``, ``exp_avg_sq``) is exposed as DTensors laid out like
    their parameters, over FusedAdamW's flat buffers, so
    torch.distributed.checkpoint (``get_state_dict`` / ``set_state_dict``) saves,
    loads and reshards it as it does torch's AdamW's. The parameters' gradients
    belong to FSDP, which accumulates into them in place: ``zero_grad`` zeroes or
    drops them and never makes them views of one flat buffer. A parameter that is
    a plain tensor is updated as FusedAdamW updates it.
    """

    supports_found_inf = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        _validate_hyper(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        with torch.no_grad():
            self._inner = FusedAdamW([dict(group, params=[_local(p) for p in group["params"]])
                                      for group in self.param_groups], lr=lr, betas=betas, eps=eps,
                                     weight_decay=weight_decay)
            for group, inner_group in zip(self.param_groups, self._inner.param_groups):
                for p, local in zip(group["params"], inner_group["params"]):
                    self.state[p] = {name: value if name == "step" else _like(value, p)
                                     for name, value in self._inner.state[local].items()}

    def add_param_group(self, param_group):
        if getattr(self, "_inner", None) is not None:
            raise RuntimeError("ShardedFusedAdamW: build a new optimizer to add parameters")
        super().add_param_group(param_group)

    def bf16_copies(self, params):
        """Refused: FSDP's mixed-precision policy casts each shard to bf16 before
        its all-gather, and the local tensors the kernel updates may be
        re-pointed by FSDP, so a copy kept here would feed no matmul."""
        raise TypeError("ShardedFusedAdamW: bf16 weight copies are not kept for sharded parameters "
                        "(under FSDP the mixed-precision policy casts each shard before its all-gather)")

    def set_lr(self, lr, group_index=None):
        """Set group["lr"] (all groups, or one) and its device copy; no host sync."""
        self._inner.set_lr(lr, group_index)
        for i, inner_group in enumerate(self._inner.param_groups):
            self.param_groups[i]["lr"] = inner_group["lr"]

    def sync_lr(self):
        """Copy every group["lr"] (e.g. set by a scheduler) into the device tensors."""
        self._sync_groups()
        self._inner.sync_lr()

    def _sync_groups(self):
        for group, inner_group in zip(self.param_groups, self._inner.param_groups):
            for name in ("lr", "betas", "eps", "weight_decay"):
                inner_group[name] = group[name]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_groups()
        # FSDP may re-point a parameter's local tensor (at its lazy init, after a
        # load): hand the kernel the current ones, their gradients as theirs.
        handed = []
        for group, inner_group in zip(self.param_groups, self._inner.param_groups):
            local_params = []
            for p in group["params"]:
                local = _local(p)
                local.grad = None if p.grad is None else _local(p.grad)
                local_params.append(local)
                handed.append(local)
            inner_group["params"] = local_params
        found_inf = getattr(self, "found_inf", None)
        try:
            if found_inf is not None:
                self._inner.found_inf = found_inf
            self._inner.step()
        finally:
            self._inner.__dict__.pop("found_inf", None)
            for local in handed:
                local.grad = None
        return loss

    def load_state_dict(self, state_dict):
        """Load a state dict in torch.optim.AdamW's format whose tensors are
        DTensors laid out like the parameters (what set_state_dict hands over), or
        local shards."""
        local_state = {pid: {name: _local(value) if isinstance(value, torch.Tensor) else value
                             for name, value in st.items()}
                       for pid, st in state_dict["state"].items()}
        for group, inner_group in zip(self.param_groups, self._inner.param_groups):
            inner_group["params"] = [_local(p) for p in group["params"]]
        self._inner.load_state_dict({"state": local_state, "param_groups": state_dict["param_groups"]})
        for group, inner_group in zip(self.param_groups, self._inner.param_groups):
            for name, value in inner_group.items():
                if name != "params":
                    group[name] = value
