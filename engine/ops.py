"""The op layer: every op a Triton kernel replaces is called through here.

Two backends with the same methods:
- `TorchOps`: PyTorch's own ops (SDPA, F.layer_norm, F.gelu, F.cross_entropy);
  runs everywhere (CPU, MPS, CUDA) and is the oracle the kernels are tested against.
- `TritonOps`: the hand-written kernels in `kernels/`. Imported lazily, so a machine
  without Triton (macOS, Windows) never touches it.

`resolve_backend("auto")` picks triton when CUDA and Triton are available, else torch.
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


def resolve_backend(name: str) -> str:
    """Map `auto` to a concrete backend and check that the one named can run."""
    if name == "auto":
        return "triton" if (torch.cuda.is_available() and triton_available()) else "torch"
    if name == "torch":
        return name
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package (Linux only); "
                               "install it or use backend='torch'")
        if not torch.cuda.is_available() and not triton_runs_on_cpu():
            raise RuntimeError("backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for "
                               "the slow CPU interpreter); use backend='torch' on CPU/MPS")
        return name
    raise ValueError(f"unknown backend {name!r}; expected auto, torch or triton")


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
        return self._k.layer_norm(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                                  eps, out_dtype=_autocast_dtype(x))

    def add_layer_norm(self, x, residual, weight, bias, eps):
        return self._k.add_layer_norm(x, residual.to(x.dtype), weight.to(x.dtype),
                                      None if bias is None else bias.to(x.dtype), eps,
                                      out_dtype=_autocast_dtype(x))

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
            return self._k.linear_cross_entropy(x.to(dtype), weight.to(dtype), targets,
                                                ignore_index=ignore_index, num_classes=num_classes,
                                                check_targets=False)


def get_ops(backend: str):
    """The op set for a backend name (auto, torch or triton)."""
    name = resolve_backend(backend)
    return TorchOps() if name == "torch" else TritonOps()
