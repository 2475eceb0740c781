"""The optimizer: AdamW with weight decay on matrices only, and its learning rate.

`configure_optimizer` splits the parameters as nanoGPT does (decay on every
parameter with dim >= 2: matmul weights and embeddings; none on biases and
LayerNorm gains) and picks the implementation:

- `triton`: `kernels.adamw.FusedAdamW`, one kernel launch per group, fp32 moments
  even for bf16 parameters (no fp32 master copy of bf16 weights, though), learning
  rate read from a device tensor that its `set_lr` fills (so its step() can be
  captured in a CUDA graph);
- `torch`: `torch.optim.AdamW`, fused on CUDA (with `capturable=True` and a tensor
  learning rate when the step is captured in a CUDA graph), plain on CPU/MPS.
  Its moments take the parameters' dtype: in `bf16-params` mode they are bf16,
  which is less precise than FusedAdamW's fp32 moments (the trainer logs a note).

The learning rate is set each step with `set_lr`, which writes into a tensor
learning rate in place (`fill_`, no host sync, graph-safe) or replaces a float.
"""
from __future__ import annotations

import inspect

import torch

from engine.errors import UserInputError

OPTIMIZERS = ("auto", "triton", "torch")


def resolve_optimizer(name: str, device_type: str, backend: str) -> str:
    """Map `auto` to `triton` (CUDA with the triton backend) or `torch`."""
    if name not in OPTIMIZERS:
        raise UserInputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "auto":
        return "triton" if (device_type == "cuda" and backend == "triton") else "torch"
    if name == "triton":
        from engine.ops import triton_available, triton_runs_on_cpu
        if not triton_available():
            raise UserInputError("optimizer 'triton' needs the triton package; use --optimizer torch")
        if device_type != "cuda" and not triton_runs_on_cpu():
            raise UserInputError("optimizer 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1); "
                                 "use --optimizer torch")
    return name


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed (dim >= 2) and not decayed (dim < 2). Tied parameters once."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() dedups ties
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def configure_optimizer(model: torch.nn.Module, cfg, device, kind: str = "torch",
                        capturable: bool = False, log=print) -> torch.optim.Optimizer:
    """AdamW over `model` with cfg.max_lr, cfg.betas, cfg.weight_decay.

    `kind` is a resolved optimizer name (`triton` or `torch`); `capturable` asks the
    torch optimizer for a device-side step count and learning rate (CUDA graphs).
    """
    device = torch.device(device)
    groups = param_groups(model, cfg.weight_decay)
    n_decay = sum(p.numel() for p in groups[0]["params"])
    n_no_decay = sum(p.numel() for p in groups[1]["params"])
    log(f"num decayed parameter tensors: {len(groups[0]['params'])}, with {n_decay:,} parameters")
    log(f"num non-decayed parameter tensors: {len(groups[1]['params'])}, with {n_no_decay:,} parameters")
    betas = tuple(float(b) for b in cfg.betas)
    if kind == "triton":
        from kernels.adamw import FusedAdamW  # deferred: Triton is optional
        return FusedAdamW(groups, lr=cfg.max_lr, betas=betas, eps=1e-8, weight_decay=cfg.weight_decay)
    kwargs = {}
    if device.type == "cuda":
        if "fused" in inspect.signature(torch.optim.AdamW).parameters:
            kwargs["fused"] = True
        if capturable:
            kwargs["capturable"] = True
    lr = cfg.max_lr
    if capturable:
        # A tensor learning rate lives on the device, so the graph reads the value
        # set_lr wrote before each replay instead of the float baked in at capture.
        lr = torch.tensor(float(cfg.max_lr), device=device, dtype=torch.float32)
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **kwargs)
    if capturable:
        # Each group gets its own tensor, so set_lr needs no aliasing assumptions.
        for group in opt.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=device, dtype=torch.float32)
    return opt


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate without a host sync: FusedAdamW's own set_lr
    (which fills its device copy), in place for tensor learning rates, else the float."""
    if hasattr(optimizer, "set_lr"):
        optimizer.set_lr(float(lr))
        return
    for group in optimizer.param_groups:
        current = group["lr"]
        if isinstance(current, torch.Tensor):
            current.fill_(lr)
        else:
            group["lr"] = lr


def get_lr_value(optimizer: torch.optim.Optimizer) -> float:
    lr = optimizer.param_groups[0]["lr"]
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
