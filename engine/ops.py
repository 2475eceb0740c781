"""The op layer: every op a Triton kernel replaces is called through here.

Two backends with the same methods:
- `TorchOps`: PyTorch's own ops (SDPA, F.layer_norm, F.gelu, F.cross_entropy);
  runs everywhere (CPU, MPS, CUDA) and is the oracle the kernels are tested against.
- `TritonOps`: the hand-written kernels in `kernels/`. Imported lazily, so a machine
  without Triton (macOS, Windows) never touches it.

`auto` means triton for CUDA tensors when Triton is installed, torch for any other
device: the trainer resolves it once for its device (`resolve_backend`); a model
built with it decides per call (`AutoOps`), so it runs wherever it is moved.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_on_cpu() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (used by the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(name: str, device_type: str | None = None) -> str:
    """The concrete backend (torch or triton) that `name` means for tensors on
    `device_type` (None: this machine's default device), checking that it can run.
    `auto` is triton on CUDA when Triton is installed, torch anywhere else."""
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown backend {name!r}; expected auto, torch or triton")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "auto":
        return "triton" if device_type == "cuda" and triton_available() else "torch"
    if name == "torch":
        return name
    if not triton_available():
        raise RuntimeError("backend 'triton' needs the triton package (Linux only); "
                           "install it or use backend='torch'")
    if device_type == "cuda" and torch.cuda.is_available():
        return name
    if device_type == "cpu" and triton_runs_on_cpu():
        return name
    raise RuntimeError(f"backend 'triton' runs its kernels on CUDA tensors (CPU ones only under "
                       f"TRITON_INTERPRET=1, the slow interpreter), and this model is on "
                       f"{device_type}: use backend='torch' there")


def causal_mask_aligned_to_end(t_q: int, t_k: int, device) -> torch.Tensor:
    """Query i sits at absolute position t_k - t_q + i and sees keys up to it."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


class TorchOps:
    name = "torch"

    @staticmethod
    def layer_norm(x, weight, bias, eps):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    @staticmethod
    def add_layer_norm(x, residual, weight, bias, eps):
        h = x + residual
        return h, F.layer_norm(h, (h.shape[-1],), weight, bias, eps)

    @staticmethod
    def attention(q, k, v, causal=True, dropout_p=0.0):
        t_q, t_k = q.shape[-2], k.shape[-2]
        if not causal or t_q == t_k:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
        # SDPA's is_causal aligns the mask to the top left; decoding needs it at the end.
        mask = causal_mask_aligned_to_end(t_q, t_k, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    @staticmethod
    def linear_gelu(x, weight, bias):
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")

    @staticmethod
    def linear_cross_entropy(x, weight, targets, num_classes, ignore_index=-100):
        logits = F.linear(x, weight)[..., :num_classes]
        return F.cross_entropy(logits.float().reshape(-1, num_classes), targets.reshape(-1),
                               ignore_index=ignore_index)


def _autocast_dtype(x: torch.Tensor):
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


class TritonOps:
    """The kernels, with the dtype plumbing autocast would otherwise do.

    Under bf16 autocast the residual stream stays fp32 (as with the torch backend),
    while everything that feeds a matmul is cast to bf16: the kernels take one dtype
    for all their inputs, so the casts happen here, once per call.
    """

    name = "triton"

    def __init__(self):
        import kernels  # deferred: Triton is optional outside Linux

        self._k = kernels

    def layer_norm(self, x, weight, bias, eps):
        # Under autocast the kernel writes y straight in the matmul dtype: no cast pass.
        return self._k.layer_norm(x, weight, bias, eps, out_dtype=_autocast_dtype(x))

    def add_layer_norm(self, x, residual, weight, bias, eps):
        # Here x is the residual stream and `residual` the branch output; the
        # kernel takes the branch first and reads each in its own dtype.
        return self._k.add_layer_norm(residual, x, weight, bias, eps, out_dtype=_autocast_dtype(x))

    def attention(self, q, k, v, causal=True, dropout_p=0.0):
        if dropout_p:
            raise ValueError("the triton backend has no attention dropout; "
                             "set dropout=0 or use backend='torch'")
        return self._k.flash_attention(q, k, v, causal=causal)

    def linear_gelu(self, x, weight, bias):
        low = _autocast_dtype(x)
        dtype = low or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return self._k.linear_gelu(x.to(dtype), weight.to(dtype),
                                       None if bias is None else bias.to(dtype))

    def linear_cross_entropy(self, x, weight, targets, num_classes, ignore_index=-100):
        low = _autocast_dtype(x)
        dtype = low or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            # The model checks target ids itself (or its trusted loader did): the
            # kernel's own check would sync with the host once per call.
            # The weight goes in its own dtype: the kernel makes the matmuls' copy
            # and returns dW in the weight's dtype (never rounded to bf16 and back).
            return self._k.linear_cross_entropy(x.to(dtype), weight, targets,
                                                ignore_index=ignore_index, num_classes=num_classes,
                                                check_targets=False)


class AutoOps:
    """backend='auto' for a model built before its device is known: each call takes
    the kernels for CUDA tensors and PyTorch's ops for any other device, so one
    model works on the CPU and on a GPU, and can move between them."""

    name = "auto"

    def __init__(self):
        self._torch = TorchOps()
        self._triton = TritonOps() if triton_available() else None

    def for_device(self, device: torch.device):
        """The op set calls on `device` use."""
        return self._triton if device.type == "cuda" and self._triton is not None else self._torch

    def layer_norm(self, x, *args, **kwargs):
        return self.for_device(x.device).layer_norm(x, *args, **kwargs)

    def add_layer_norm(self, x, *args, **kwargs):
        return self.for_device(x.device).add_layer_norm(x, *args, **kwargs)

    def attention(self, q, *args, **kwargs):
        return self.for_device(q.device).attention(q, *args, **kwargs)

    def linear_gelu(self, x, *args, **kwargs):
        return self.for_device(x.device).linear_gelu(x, *args, **kwargs)

    def linear_cross_entropy(self, x, *args, **kwargs):
        return self.for_device(x.device).linear_cross_entropy(x, *args, **kwargs)


def get_ops(backend: str):
    """The op set for a backend name: torch, triton, or auto (chosen per call by
    the tensors' device)."""
    if backend == "auto":
        return AutoOps()
    name = resolve_backend(backend)
    return TorchOps() if name == "torch" else TritonOps()
