"""The op layer: the engine's only door to `gpt2_kernels/`.

Two op sets with the same methods:
- `TorchOps`: PyTorch's own ops (SDPA, F.layer_norm, F.gelu, F.cross_entropy);
  runs everywhere (CPU, MPS, CUDA) and is the oracle the kernels are tested against.
- `TritonOps`: the hand-written kernels in `gpt2_kernels/`, imported lazily so that a
  machine without Triton (macOS, Windows) never touches them.

`auto` means triton for CUDA tensors when Triton is installed, torch for any other
device: the trainer resolves it once for its device (`resolve_backend`); a model
built with it decides per call (`AutoOps`), so it runs wherever it is moved.
Backend names are validated where the user gives them (GPTConfig, TrainConfig);
this layer only maps them.

Semantics both op sets share, where PyTorch's own ops differ:
- `linear_cross_entropy` over targets that are all `ignore_index` is 0 with zero
  gradients (F.cross_entropy's mean would be 0/0 = nan), so a batch of padding
  never reads as a diverged step.
- causal attention with fewer queries than keys aligns the mask to the end of the
  keys (decoding with a KV cache); SDPA's is_causal aligns it to the start.
- `linear_cross_entropy` refuses a target outside [0, num_classes) that is not
  ignore_index, as F.cross_entropy does; on the triton backend that check costs
  a host sync, and `check_targets=False` skips it for targets already checked.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.config import Fusions


def triton_unusable_reason(device_type: str) -> str | None:
    """Why the Triton kernels cannot run on `device_type` tensors here, or None when
    they can: CUDA with the triton package, or CPU under TRITON_INTERPRET=1 (the
    slow interpreter the tests use). The one place this is decided."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (it ships for Linux only)"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA GPU is available"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the kernels run on CUDA tensors (CPU ones only under TRITON_INTERPRET=1, the "
            f"slow interpreter), and this is {device_type}")


def resolve_backend(name: str, device_type: str) -> str:
    """The op set (torch or triton) that backend `name` means for tensors on
    `device_type`. RuntimeError when `triton` is asked for where it cannot run."""
    if name == "auto":
        return "triton" if device_type == "cuda" and triton_unusable_reason("cuda") is None else "torch"
    if name == "triton":
        reason = triton_unusable_reason(device_type)
        if reason is not None:
            raise RuntimeError(f"backend 'triton' cannot run here: {reason}; use backend 'torch'")
    return name


def causal_mask_aligned_to_end(t_q: int, t_k: int, device) -> torch.Tensor:
    """Query i sits at absolute position t_k - t_q + i and sees keys up to it."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def _unpack_qkv(qkv):
    """(B, T, 3, H, D) -> three (B, H, T, D) views."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


class TorchOps:
    name = "torch"

    @staticmethod
    def embedding(idx, wte, wpe, start, out_dtype):
        """wte[idx] + wpe[start:start + T] for idx (B, T), rounded once to out_dtype."""
        pos = torch.arange(start, start + idx.shape[-1], dtype=torch.long, device=idx.device)
        return (F.embedding(idx, wte) + F.embedding(pos, wpe)).to(out_dtype)

    @staticmethod
    def dropout_add_layer_norm(x, residual, weight, bias, eps, dropout_p=0.0):
        """(LN(h), h) with h = residual + dropout(x) in residual's dtype (h = dropout(x)
        when residual is None). LN(h) is computed in the weights' dtype (autocast
        chooses under autocast): a bf16 stream feeds fp32 layers in fp32."""
        h = F.dropout(x, dropout_p) if dropout_p > 0 else x
        if residual is not None:
            # A bf16 stream plus an fp32 branch promotes to fp32: the stream keeps its dtype.
            h = (residual + h).to(residual.dtype)
        normed = h if torch.is_autocast_enabled(h.device.type) else h.to(weight.dtype)
        return F.layer_norm(normed, (h.shape[-1],), weight, bias, eps), h

    @staticmethod
    def attention(q, k, v, causal=True, dropout_p=0.0):
        t_q, t_k = q.shape[-2], k.shape[-2]
        if not causal or t_q == t_k:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
        mask = causal_mask_aligned_to_end(t_q, t_k, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    @staticmethod
    def attention_qkvpacked(qkv, dropout_p=0.0):
        """Causal self-attention over the (B, T, 3, H, D) projection; (B, H, T, D) out."""
        q, k, v = _unpack_qkv(qkv)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)

    @staticmethod
    def linear(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def linear_gelu(x, weight, bias):
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")

    @staticmethod
    def mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
        return F.linear(F.gelu(F.linear(x, fc_weight, fc_bias), approximate="tanh"), proj_weight, proj_bias)

    @staticmethod
    def training_step(grad_scale: float, weight_copies=None):
        """The training step's forward (GPT.forward_backward): nothing to change here."""
        return contextlib.nullcontext()

    @staticmethod
    def linear_cross_entropy(x, weight, targets, num_classes, ignore_index=-100, check_targets=True):
        # F.cross_entropy checks the targets itself, whatever check_targets says.
        logits = F.linear(x, weight)[..., :num_classes].float().reshape(-1, num_classes)
        targets = targets.reshape(-1)
        total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
        return total / (targets != ignore_index).sum().clamp(min=1)


def _autocast_dtype(x: torch.Tensor):
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


@dataclass(frozen=True)
class StepContext:
    """What the training step's forward tells the kernels (GPT.forward_backward):
    the loss's gradient, known before the backward, and the bf16 weight copies."""

    grad_scale: float
    weight_copies: object | None  # engine.weight_copies.WeightCopies


class TritonOps:
    """The kernels, fed as autocast would feed PyTorch's ops.

    Under bf16 autocast everything that feeds a matmul is bf16: the LayerNorm
    kernels read the bf16 branch, the residual stream (fp32, or bf16 with
    GPTConfig.residual_dtype) and the fp32 weights as they are and write their
    output straight in bf16; the linear layers and the loss read the fp32
    weights (or their bf16 copies) as they are. `fusions` (engine.config.Fusions)
    says which of the fused paths run; each has the path before it beside it.
    Dropout masks come from a seed each kernel draws per call from the device's
    default generator (gpt2_kernels/_common.py): reproducible under torch.manual_seed,
    fresh on every CUDA-graph replay, restored with the RNG state on resume.

    Inside `training_step(...)` (the forward of GPT.forward_backward) the kernels
    also add weight gradients into .grad (grad_accumulation), read the bf16
    weight copies (bf16_weights) and take the LM head's gradient for the known
    loss scale during the forward.
    """

    name = "triton"

    def __init__(self, fusions: Fusions = Fusions(), deterministic: bool = True):
        import gpt2_kernels  # deferred: Triton is optional outside Linux

        self._k = gpt2_kernels
        self.fusions = fusions
        # Attention's backward without atomics (bit-reproducible), or the
        # faster atomic one (GPTConfig.deterministic).
        self.deterministic = deterministic
        self._step: StepContext | None = None

    @contextlib.contextmanager
    def training_step(self, grad_scale: float, weight_copies=None):
        """Within: the forward of one training micro-step whose backward is
        `loss.backward(gradient=grad_scale)` and nothing else."""
        self._step = StepContext(grad_scale, weight_copies)
        try:
            yield
        finally:
            self._step = None

    def _accumulating(self) -> bool:
        return self._step is not None and self.fusions.grad_accumulation

    def _copy(self, weight, dtype):
        """The optimizer's bf16 copy of `weight` for a matmul in `dtype`, or None."""
        step = self._step
        if (step is None or step.weight_copies is None or not self.fusions.bf16_weights
                or dtype != torch.bfloat16):
            return None
        return step.weight_copies.get(weight)

    def embedding(self, idx, wte, wpe, start, out_dtype):
        if not self.fusions.grad_accumulation:
            return TorchOps.embedding(idx, wte, wpe, start, out_dtype)
        return self._k.embedding(idx, wte, wpe, start, out_dtype=out_dtype,
                                 accumulate_grad=self._accumulating())

    def dropout_add_layer_norm(self, x, residual, weight, bias, eps, dropout_p=0.0):
        # y in the dtype the next layer computes in: autocast's, else the weights'.
        h, y = self._k.add_layer_norm(x, residual, weight, bias, eps,
                                      out_dtype=_autocast_dtype(x) or weight.dtype,
                                      dropout_p=dropout_p, accumulate_grad=self._accumulating())
        return y, h

    def attention(self, q, k, v, causal=True, dropout_p=0.0):
        return self._k.flash_attention(q, k, v, causal=causal, dropout_p=dropout_p,
                                       deterministic=self.deterministic)

    def attention_qkvpacked(self, qkv, dropout_p=0.0):
        return self._k.flash_attention_qkvpacked(qkv, causal=True, dropout_p=dropout_p,
                                                 deterministic=self.deterministic)

    def linear(self, x, weight, bias):
        if not self.fusions.epilogues:
            return F.linear(x, weight, bias)
        dtype = _autocast_dtype(x) or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return self._k.linear(x.to(dtype), weight, bias, compute_weight=self._copy(weight, dtype),
                                  accumulate_grad=self._accumulating())

    def linear_gelu(self, x, weight, bias):
        dtype = _autocast_dtype(x) or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return self._k.linear_gelu(x.to(dtype), weight.to(dtype),
                                       None if bias is None else bias.to(dtype))

    def mlp(self, x, fc_weight, fc_bias, proj_weight, proj_bias):
        if not self.fusions.epilogues:
            return F.linear(self.linear_gelu(x, fc_weight, fc_bias), proj_weight, proj_bias)
        dtype = _autocast_dtype(x) or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return self._k.mlp(x.to(dtype), fc_weight, fc_bias, proj_weight, proj_bias,
                               fc_compute_weight=self._copy(fc_weight, dtype),
                               proj_compute_weight=self._copy(proj_weight, dtype),
                               accumulate_grad=self._accumulating())

    def linear_cross_entropy(self, x, weight, targets, num_classes, ignore_index=-100, check_targets=True):
        dtype = _autocast_dtype(x) or x.dtype
        accumulate = self._accumulating()
        with torch.autocast(x.device.type, enabled=False):
            # check_targets costs a host sync per call: the trainer turns it off,
            # its loaders having checked the ids on the CPU.
            return self._k.linear_cross_entropy(
                x.to(dtype), weight, targets, ignore_index=ignore_index, num_classes=num_classes,
                check_targets=check_targets, compute_weight=self._copy(weight, dtype),
                grad_output=self._step.grad_scale if accumulate else None, accumulate_grad=accumulate,
                one_pass=self.fusions.cross_entropy)


class AutoOps:
    """backend='auto' for a model built before its device is known: each call takes
    the kernels for CUDA tensors and PyTorch's ops for any other device, so one
    model works on the CPU and on a GPU, and can move between them."""

    name = "auto"

    def __init__(self, fusions: Fusions = Fusions(), deterministic: bool = True):
        self._torch = TorchOps()
        self._triton = (TritonOps(fusions, deterministic)
                        if importlib.util.find_spec("triton") is not None else None)

    @contextlib.contextmanager
    def training_step(self, grad_scale: float, weight_copies=None):
        with (self._triton.training_step(grad_scale, weight_copies) if self._triton is not None
              else contextlib.nullcontext()):
            yield

    def for_device(self, device: torch.device):
        """The op set calls on `device` use."""
        return self._triton if device.type == "cuda" and self._triton is not None else self._torch

    def embedding(self, idx, *args, **kwargs):
        return self.for_device(idx.device).embedding(idx, *args, **kwargs)

    def dropout_add_layer_norm(self, x, *args, **kwargs):
        return self.for_device(x.device).dropout_add_layer_norm(x, *args, **kwargs)

    def attention(self, q, *args, **kwargs):
        return self.for_device(q.device).attention(q, *args, **kwargs)

    def attention_qkvpacked(self, qkv, *args, **kwargs):
        return self.for_device(qkv.device).attention_qkvpacked(qkv, *args, **kwargs)

    def linear(self, x, *args, **kwargs):
        return self.for_device(x.device).linear(x, *args, **kwargs)

    def linear_gelu(self, x, *args, **kwargs):
        return self.for_device(x.device).linear_gelu(x, *args, **kwargs)

    def mlp(self, x, *args, **kwargs):
        return self.for_device(x.device).mlp(x, *args, **kwargs)

    def linear_cross_entropy(self, x, *args, **kwargs):
        return self.for_device(x.device).linear_cross_entropy(x, *args, **kwargs)


def get_ops(backend: str, fusions: Fusions = Fusions(), deterministic: bool = True):
    """The op set for a backend name: torch, triton, or auto (chosen per call by
    the tensors' device); `fusions` says what the triton one fuses, and
    `deterministic` picks the kernels' attention backward without atomics
    (PyTorch's ops ignore both)."""
    if backend == "auto":
        return AutoOps(fusions, deterministic)
    name = resolve_backend(backend, "cuda" if torch.cuda.is_available() else "cpu")
    return TorchOps() if name == "torch" else TritonOps(fusions, deterministic)


def fused_adamw(param_groups, *, lr: float, betas, eps: float, weight_decay: float):
    """The Triton FusedAdamW (one launch per group, fp32 moments, lr and step on the
    device); see gpt2_kernels/adamw.py. Over DTensor parameters (FSDP) its sharded
    form, which updates each process's shards and keeps its state as DTensors."""
    from torch.distributed.tensor import DTensor

    from gpt2_kernels import FusedAdamW, ShardedFusedAdamW  # deferred: Triton is optional outside Linux
    sharded = any(isinstance(p, DTensor) for group in param_groups for p in group["params"])
    cls = ShardedFusedAdamW if sharded else FusedAdamW
    return cls(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
