"""One training step, build-nanogpt's inner loop: the only copy of it.

The eager trainer, the CUDA-graph capture (engine.cuda_graph) and the training
benchmark all call `train_step`:

    zero the gradients
    for each micro-batch: forward under autocast, loss / accum, backward
    clip the global gradient norm
    AdamW step, unless the loss or the norm is not finite

A bare model in one process runs each micro-batch as its own micro-step
(GPT.forward_backward, the loss's gradient 1 / accum known before the forward), so
that its kernels can add the gradients into .grad and read the optimizer's bf16
weight copies; a model wrapped in DDP, sharded by FSDP or compiled goes through its
wrapper and autograd. Both give the same gradients.

A step whose loss or gradient norm is NaN or infinite never reaches the weights:
the optimizer skips it on the device (a `found_inf` flag, as torch's GradScaler
hands it to the fused AdamW kernels), so the CUDA graph needs no host sync for
it. Optimizers without that flag (torch's non-fused AdamW on the CPU) check it on
the host, which costs nothing there. The trainer reads loss and norm when it
logs and decides what to do about a run of skipped steps.
"""
from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

from engine.config import AUTOCAST_DTYPES


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_factory(dtype: str, device_type: str, cache_enabled: bool = True):
    """A zero-argument callable giving a fresh autocast context: autocast to bf16 or
    fp16 for dtype "bf16" or "fp16", no autocast otherwise. A captured CUDA graph
    needs cache_enabled=False: autocast's cache of cast weights would hold tensors
    of the capture that replays never refresh."""
    if dtype in AUTOCAST_DTYPES:
        return lambda: torch.autocast(device_type=device_type, dtype=TORCH_DTYPES[dtype],
                                      cache_enabled=cache_enabled)
    return contextlib.nullcontext


def _skips_on_device(optimizer) -> bool:
    """Whether `optimizer.step()` honours a device-side `found_inf` flag."""
    if getattr(optimizer, "supports_found_inf", False):  # FusedAdamW
        return True
    return isinstance(optimizer, torch.optim.AdamW) and any(g.get("fused") for g in optimizer.param_groups)


def optimizer_step_if_finite(optimizer, finite: torch.Tensor) -> None:
    """optimizer.step() when the 0-d bool tensor `finite` is true; nothing otherwise
    (weights, moments and step counts untouched)."""
    if _skips_on_device(optimizer):
        optimizer.found_inf = (~finite).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(finite):
        optimizer.step()


@contextlib.contextmanager
def gradient_sync(model, sync: bool):
    """Around one micro-batch's forward and backward: reduce the gradients over the
    processes only when `sync` (the last micro-batch), so a step reduces once.
    DDP all-reduces unless inside `no_sync()`; FSDP reduce-scatters unless told
    `set_requires_gradient_sync(False)` (it then accumulates unsharded gradients
    until the synced backward); a single process has nothing to reduce."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a tensor that may be a DTensor (the norm of FSDP's
    sharded gradients is one): the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _forward_backward(model):
    """The model's own micro-step (GPT.forward_backward), where the step may use
    it: a bare model in a single process. A wrapped or sharded one (DDP, FSDP,
    torch.compile) runs forward and backward through its wrapper, whose hooks
    reduce the gradients."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    if hasattr(model, "no_sync") or hasattr(model, "set_requires_gradient_sync"):
        return None
    if not callable(getattr(type(model), "forward_backward", None)):
        return None
    return model.forward_backward


def train_step(model, optimizer, xs: torch.Tensor, ys: torch.Tensor, *, grad_clip: float,
               autocast, all_reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over the micro-batches xs[i], ys[i] (xs, ys: (accum, B, T)
    int64 on the model's device). Returns (mean loss, global grad norm before
    clipping) as 0-d fp32 device tensors; reading them is the caller's host sync.

    `model` may be wrapped in DDP or sharded by FSDP: the gradients are reduced
    once, in the last micro-batch's backward (gradient_sync). `all_reduce(t)` (in
    place, mean over ranks) makes the logged loss the global one. grad_clip <= 0
    means no clipping.
    """
    accum = xs.size(0)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Gradients are zeroed in place, never freed: their addresses stay fixed, which
    # the captured graph and FusedAdamW's launch table rely on.
    optimizer.zero_grad(set_to_none=False)
    loss = torch.zeros((), dtype=torch.float32, device=xs.device)
    forward_backward = _forward_backward(model)
    for i in range(accum):
        if forward_backward is not None:
            # The loaders checked the ids: no per-call host sync for it here.
            loss += forward_backward(xs[i], ys[i], grad_scale=1.0 / accum, autocast=autocast,
                                     check_targets=False).float() / accum
            continue
        with gradient_sync(model, sync=i == accum - 1):
            with record_function("forward"), autocast():
                # The loaders checked the ids: no per-call host sync for it here.
                _, micro_loss = model(xs[i], ys[i], return_logits=False, check_targets=False)
            micro_loss = micro_loss / accum
            loss += micro_loss.detach().float()
            with record_function("backward"):
                micro_loss.backward()
    if all_reduce is not None:
        all_reduce(loss)
    grads = [p.grad for p in params if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    norm = full_value(norm)  # under FSDP: the norm over every shard of every process
    finite = torch.isfinite(loss) & torch.isfinite(norm)
    with record_function("optimizer_step"):
        optimizer_step_if_finite(optimizer, finite)
    return loss, norm.float()
