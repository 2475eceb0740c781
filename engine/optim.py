"""The optimizer: AdamW with weight decay on matrices only, and its learning rate.

`configure_optimizer` splits the parameters as nanoGPT does (decay on every
parameter with dim >= 2: matmul weights and embeddings; none on biases and
LayerNorm gains) and builds one of two implementations:

- `triton`: the Triton FusedAdamW (through the op layer), one kernel launch per
  group, fp32 moments even for bf16 parameters, learning rate and step count on
  the device (so its step() can be captured in a CUDA graph);
- `torch`: `torch.optim.AdamW`, fused on CUDA (with `capturable=True` and a tensor
  learning rate when the step is captured in a CUDA graph), plain on CPU/MPS. Its
  moments take the parameters' dtype: bf16 in `bf16-params` mode.

`lr_at(step, ...)` is build-nanogpt's schedule; `set_lr` writes it each step in
place (`fill_`: no host sync, graph-safe) or replaces a float.
"""
from __future__ import annotations

import math

import torch

from engine import ops


def resolve_optimizer(name: str, device_type: str, backend: str) -> str:
    """`auto` is `triton` on CUDA with the triton backend, else `torch`; an explicit
    `triton` must be able to run its kernel here."""
    if name == "auto":
        return "triton" if (device_type == "cuda" and backend == "triton") else "torch"
    if name == "triton":
        reason = ops.triton_unusable_reason(device_type)
        if reason is not None:
            raise RuntimeError(f"optimizer 'triton' cannot run here: {reason}; use optimizer 'torch'")
    return name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed (dim >= 2) and not decayed (dim < 2). Tied parameters once."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() dedups ties
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def configure_optimizer(model: torch.nn.Module, *, lr: float, betas, weight_decay: float, device,
                        kind: str = "torch", capturable: bool = False, weight_copies: bool = False,
                        log=print):
    """AdamW over `model`. `kind` is a resolved optimizer name (triton or torch);
    `capturable` asks the torch optimizer for a device-side step count and learning
    rate (CUDA graphs). `weight_copies`: the optimizer also keeps bf16 copies of the
    model's matmul weights (engine.weight_copies), set as `model.weight_copies`."""
    device = torch.device(device)
    groups = param_groups(model, weight_decay)
    for group, what in zip(groups, ("decayed", "non-decayed")):
        log(f"num {what} parameter tensors: {len(group['params'])}, with "
            f"{sum(p.numel() for p in group['params']):,} parameters")
    betas = tuple(float(b) for b in betas)
    if kind == "triton":
        opt = ops.fused_adamw(groups, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay)
        return _with_weight_copies(model, opt, weight_copies, log)
    kwargs = {}
    if device.type == "cuda":
        kwargs["fused"] = True
        if capturable:
            kwargs["capturable"] = True
            # A tensor learning rate lives on the device, so the graph reads the value
            # set_lr wrote before each replay instead of the float baked in at capture.
            lr = torch.tensor(float(lr), device=device, dtype=torch.float32)
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **kwargs)
    if capturable:
        # Each group its own tensor, so set_lr needs no aliasing assumptions.
        for group in opt.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device, dtype=torch.float32)
    return _with_weight_copies(model, opt, weight_copies, log)


def _with_weight_copies(model, optimizer, wanted: bool, log):
    if wanted:
        from engine.weight_copies import WeightCopies
        model.weight_copies = WeightCopies(model.matmul_weights(), optimizer)
        writer = "in its update kernel" if hasattr(optimizer, "bf16_copies") else "after each step"
        log(f"bf16 copies of the {len(model.weight_copies)} matmul weights, written by the optimizer "
            f"{writer}")
    return optimizer


def set_lr(optimizer, lr: float) -> None:
    """Set every group's learning rate without a host sync: FusedAdamW's own set_lr
    (which fills its device copy), in place for tensor learning rates, else the float."""
    if hasattr(optimizer, "set_lr"):
        optimizer.set_lr(float(lr))
        return
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up to max_lr over warmup_steps, then cosine decay to min_lr at
    max_steps; min_lr from then on (build-nanogpt's schedule)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    span = max_steps - warmup_steps
    ratio = (step - warmup_steps) / span if span > 0 else 1.0
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
