"""Fused AdamW: every parameter of a group updated by one Triton launch.

Layout. Each group owns two flat float32 buffers (exp_avg, exp_avg_sq) and a
float32 step counter per parameter; the per-parameter optimizer state that
`state_dict()` exposes ('step', 'exp_avg', 'exp_avg_sq', torch.optim.AdamW's
format) is made of views into them. Parameters and gradients stay where they
are: the kernel reads their addresses from a small int64 table
(param address, grad address, numel, state offset, first block, slot), and a
block map sends each program of a 1-D grid to its parameter, so a group of any
shapes is one launch with no padding and no empty programs.

Capturable by design: the learning rate and the step counters live in device
tensors that the kernel reads, bias corrections are computed on the device,
and `step()` reads nothing back from the device, so a CUDA graph can capture it.
"""
import contextlib
import os
import struct

import torch
import triton
import triton.language as tl

# Columns of the per-parameter table: param address, grad address, numel,
# state offset, first block, slot.
_TABLE_W = 6


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
def _adamw_kernel(
    table_ptr, block_param_ptr,
    exp_avg_ptr, exp_avg_sq_ptr, steps_ptr, lr_ptr,
    p_like_ptr,
    beta1, beta1_lo, beta2, beta2_lo, one_minus_beta1, one_minus_beta2,
    eps, weight_decay,
    TABLE_W: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table_ptr + tl.load(block_param_ptr + pid) * TABLE_W
    # Params and grads share the group's dtype (torch guarantees grad.dtype == param.dtype).
    elem_ptr_ty = tl.pointer_type(p_like_ptr.dtype.element_ty)
    p_ptr = tl.load(row + 0).to(elem_ptr_ty)
    g_ptr = tl.load(row + 1).to(elem_ptr_ty)
    numel = tl.load(row + 2)
    state_off = tl.load(row + 3)
    first_block = tl.load(row + 4)
    slot = tl.load(row + 5)

    offs = (pid - first_block).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel

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

    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + state_off + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + state_off + offs, mask=mask, other=0.0)

    # Same operation order as torch.optim.AdamW's single-tensor path.
    p = p * (1.0 - lr * weight_decay)
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)

    tl.store(p_ptr + offs, p.to(p_like_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_ptr + state_off + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + state_off + offs, v, mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_config():
    """(BLOCK, num_warps). No autotune: the kernel updates its operands in place."""
    if _interpreting():
        return 128, 1  # small, so interpreted tests span several blocks per param
    return 2048, 8


def _split_f64(x: float):
    """x as float32 hi + lo, so a float32 kernel argument pair carries ~48 bits."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


class _GroupBuffers:
    """Device state of one param group: flat moments, step counters, lr, the launch table."""

    def __init__(self, params, device, dtype):
        self.device = device
        self.dtype = dtype
        sizes = [p.numel() for p in params]
        self.offsets = []
        total = 0
        for s in sizes:
            self.offsets.append(total)
            total += s
        self.exp_avg = torch.zeros(total, device=device, dtype=torch.float32)
        self.exp_avg_sq = torch.zeros(total, device=device, dtype=torch.float32)
        # float32 like torch.optim.AdamW's 'step' tensors; exact up to 2**24 steps.
        self.steps = torch.zeros(len(params), device=device, dtype=torch.float32)
        self.lr = torch.zeros((), device=device, dtype=torch.float32)
        self.lr_value = None  # the float last written into self.lr
        self.key = None  # identifies the table below: (slot, param addr, grad addr) of active params
        self.table = None
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
        rows = [[p_addr, g_addr, params[slot].numel(), self.offsets[slot], first, slot]
                for (slot, p_addr, g_addr), first in zip(key, self.first_blocks)]
        self.table = self._to_device(torch.tensor(rows, dtype=torch.int64).reshape(-1))
        self.key = key



def _on_device(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be t's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _as_float(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else value


def _validate_hyper(lr, betas, eps, weight_decay):
    if isinstance(lr, torch.Tensor):
        raise TypeError("FusedAdamW: lr must be a Python number, not a Tensor "
                        "(the optimizer keeps its own device copy)")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas}; expected two values")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) in one Triton launch per group.

    Args mirror torch.optim.AdamW: params, lr=1e-3, betas=(0.9, 0.999),
    eps=1e-8, weight_decay=1e-2 (no amsgrad, no maximize).

    - Parameters of a group must share one device and one dtype (float32 or
      bfloat16) and be contiguous. Moments are always float32. bfloat16
      parameters are updated in float32 and rounded back to bfloat16 each step:
      there is NO float32 master copy (keep the model in float32 under autocast
      if updates smaller than a bf16 ulp matter).
    - Parameters whose .grad is None are skipped that step (their step counter
      does not advance), as in torch. Changing which parameters have gradients,
      or their gradients' addresses (e.g. ``zero_grad(set_to_none=True)`` when
      the allocator hands back other blocks), rebuilds the group's launch table:
      a host loop over the group and one small host-to-device copy.
    - Capturable: ``step()`` reads nothing from the device. The learning rate is
      copied from ``group["lr"]`` (a Python float, so schedulers work) into a
      device tensor with ``fill_`` whenever it changed; while a CUDA graph is
      being captured that copy is skipped, and you change the lr of a captured
      step by calling ``set_lr()`` (or ``sync_lr()`` after a scheduler) before
      replaying. Run one eager step before capturing (it compiles the kernel
      and builds the table). betas/eps/weight_decay are baked into a captured graph.
    - ``state_dict()``/``load_state_dict()`` use torch.optim.AdamW's format
      ('step', 'exp_avg', 'exp_avg_sq' per parameter) so either optimizer can
      resume from the other's checkpoint. As in torch, the state dict holds
      references to the live state tensors (views into the flat buffers).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        _validate_hyper(lr, betas, eps, weight_decay)
        self._group_buffers = []
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    # -- construction -----------------------------------------------------------------
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            self._group_buffers.append(self._build_buffers(group))
        except Exception:
            self.param_groups.pop()
            raise

    def _build_buffers(self, group):
        params = group["params"]
        if not params:
            raise ValueError("FusedAdamW: a parameter group has no parameters")
        device, dtype = params[0].device, params[0].dtype
        for i, p in enumerate(params):
            if p.device != device:
                raise ValueError(f"FusedAdamW: parameter {i} of a group is on {p.device} but "
                                 f"parameter 0 is on {device}; a group must be on one device")
            if p.dtype != dtype:
                raise TypeError(f"FusedAdamW: parameter {i} of a group has dtype {p.dtype} but "
                                f"parameter 0 has {dtype}; put different dtypes in different groups")
            if not p.is_contiguous():
                raise ValueError(f"FusedAdamW: parameter {i} of a group is not contiguous")
        if dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"FusedAdamW: parameters have dtype {dtype}; supported: float32, bfloat16")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(f"FusedAdamW: parameters are on {device}; CUDA tensors are needed "
                             "(CPU tensors only run under TRITON_INTERPRET=1)")
        buffers = _GroupBuffers(params, device, dtype)
        for slot, p in enumerate(params):
            self.state[p] = buffers.state_views(slot, p)
        return buffers

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
        if buffers.lr_value != lr:
            buffers.lr.fill_(lr)
            buffers.lr_value = lr

    # -- the update ---------------------------------------------------------------------
    def _active_key(self, group):
        key = []
        for slot, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:
                raise RuntimeError("FusedAdamW does not support sparse gradients")
            if g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
                raise ValueError(f"FusedAdamW: gradient of parameter {slot} has "
                                 f"{g.dtype}/{tuple(g.shape)}/{g.device}, parameter has "
                                 f"{p.dtype}/{tuple(p.shape)}/{p.device}")
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
        block, num_warps = _block_config()
        for i, group in enumerate(self.param_groups):
            buffers = self._group_buffers[i]
            key = self._active_key(group)
            if not key:
                continue
            if key != buffers.key:
                buffers.refresh(key, group["params"], block)
            capturing = buffers.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            if not capturing:
                self._push_lr(i)
            buffers.steps.add_(buffers.active_mask)
            if buffers.n_blocks == 0:
                continue  # only empty parameters: their steps advanced, nothing else to do
            beta1, beta2 = group["betas"]
            b1_hi, b1_lo = _split_f64(beta1)
            b2_hi, b2_lo = _split_f64(beta2)
            with _on_device(group["params"][0]):
                _adamw_kernel[(buffers.n_blocks,)](
                    buffers.table, buffers.block_param,
                    buffers.exp_avg, buffers.exp_avg_sq, buffers.steps, buffers.lr,
                    group["params"][0],
                    b1_hi, b1_lo, b2_hi, b2_lo, 1.0 - beta1, 1.0 - beta2,
                    group["eps"], group["weight_decay"],
                    TABLE_W=_TABLE_W, BLOCK=block, num_warps=num_warps,
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
