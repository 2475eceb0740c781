"""GPT-2, read top to bottom: LayerNorm, attention, MLP, block, model.

Every op that a Triton kernel replaces goes through the op set (`engine.ops`)
the model was built with (`GPTConfig.backend`); the modules keep it from
construction. The state dict has the layout of nanoGPT and (Conv1D transposed
aside) of Hugging Face's GPT2LMHeadModel.

The residual stream is written in the pre-norm form of flash-attention's
`Block`: a block takes the previous sublayer's output `x` (not yet added) and
the residual stream, and each LayerNorm first adds the dropped-out `x` to the
stream, so dropout, residual add and normalisation are one fused op:

    embeddings -> [dropout, add, LN, attention, dropout, add, LN, MLP] x n_layer
               -> dropout, add, LN (ln_f) -> LM head
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.profiler import record_function

from engine.config import Fusions, GPTConfig
from engine.errors import UserInputError
from engine.hf import load_hf_folder, save_pretrained
from engine.ops import AutoOps, get_ops
from engine.sources import load_engine_model, source_kind


class LayerNorm(nn.Module):
    """LayerNorm of the residual stream after a dropped-out branch is added to it.

    forward(x, residual) -> (LN(residual + dropout(x)), residual + dropout(x));
    with residual None the stream starts at dropout(x) (the embeddings).
    """

    def __init__(self, ndim: int, config: GPTConfig, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if config.bias else None
        self.eps = config.layer_norm_eps
        self.dropout = config.dropout
        self.ops = ops

    def forward(self, x, residual=None):
        p = self.dropout if self.training else 0.0
        return self.ops.dropout_add_layer_norm(x, residual, self.weight, self.bias, self.eps, p)


class KVCache:
    """One attention layer's keys and values of the positions already seen,
    preallocated to the block size (decoding appends one position per call)."""

    def __init__(self, batch_size: int, config: GPTConfig, device, dtype):
        shape = (batch_size, config.n_head, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, k, v):
        """Store k, v (B, H, T, D) after the cached positions; return all keys and values so far."""
        start, end = self.length, self.length + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, ops):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.ops = ops
        self.kv_cache: KVCache | None = None  # set by GPT.kv_caches() while generating

    def forward(self, x):
        B, T, C = x.shape
        # (B, T, 3, H, D): the attention reads q, k, v as strided views of it and
        # writes their gradients straight back into this layout.
        qkv = self.ops.linear(x, self.c_attn.weight, self.c_attn.bias)
        qkv = qkv.view(B, T, 3, self.n_head, C // self.n_head)
        if self.kv_cache is None:
            y = self.ops.attention_qkvpacked(qkv, dropout_p=self.dropout if self.training else 0.0)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            k, v = self.kv_cache.append(k, v)
            y = self.ops.attention(q, k.to(q.dtype), v.to(q.dtype), causal=True)
        # y is (B, H, T, D) laid out as (B, T, H, D): this reshape is free.
        return self.ops.linear(y.transpose(1, 2).reshape(B, T, C), self.c_proj.weight, self.c_proj.bias)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, ops):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.ops = ops

    def forward(self, x):
        # c_fc, the tanh GELU and c_proj are one op (their backward's elementwise
        # work lives in the matmuls on the triton backend).
        return self.ops.mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)


class Block(nn.Module):
    """Pre-LN block: dropout, add, LN, attention, dropout, add, LN, MLP.

    forward(x, residual) -> (x, residual): x is the previous sublayer's output
    (the embeddings for the first block), residual the stream it is added to
    (None for the first block); the MLP output returned is added by the next
    block's ln_1, or by ln_f.
    """

    def __init__(self, config: GPTConfig, ops):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config, ops)
        self.attn = CausalSelfAttention(config, ops)
        self.ln_2 = LayerNorm(config.n_embd, config, ops)
        self.mlp = MLP(config, ops)

    def forward(self, x, residual):
        x, residual = self.ln_1(x, residual)
        x = self.attn(x)
        x, residual = self.ln_2(x, residual)
        x = self.mlp(x)
        return x, residual


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.ops = get_ops(config.backend, Fusions.parse(config.fusions),
                           deterministic=config.deterministic)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, self.ops) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config, self.ops),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # bf16 copies of the matmul weights that the optimizer keeps (engine.weight_copies),
        # read by forward_backward under bf16 autocast; None: the weights are cast.
        self.weight_copies = None

    @property
    def backend(self) -> str:
        """The op set the model's calls use now: torch or triton (auto resolves
        by the device the weights are on)."""
        if isinstance(self.ops, AutoOps):
            return self.ops.for_device(self.lm_head.weight.device).name
        return self.ops.name

    def _init_weights(self, module):
        # GPT-2 init: N(0, 0.02), residual projections scaled by (2 * n_layer) ** -0.5
        # so the residual stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def residual_dtype(self) -> torch.dtype:
        """The dtype the residual stream is stored in (GPTConfig.residual_dtype):
        the embeddings start it in this dtype and every add keeps it there."""
        if self.config.residual_dtype == "bf16":
            return torch.bfloat16
        return self.transformer.wte.weight.dtype

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied LM head counts once
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    @contextlib.contextmanager
    def kv_caches(self, batch_size: int, dtype: torch.dtype | None = None):
        """Within this context every attention layer keeps the keys and values of the
        positions already seen, so each forward call runs only the new positions
        (generation). Leaving it drops the caches."""
        device = self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        layers = [block.attn for block in self.transformer.h]
        for attn in layers:
            attn.kv_cache = KVCache(batch_size, self.config, device, dtype)
        try:
            yield
        finally:
            for attn in layers:
                attn.kv_cache = None

    def cached_length(self) -> int:
        """Positions held in the KV caches (0 outside `kv_caches()`)."""
        cache = self.transformer.h[0].attn.kv_cache if len(self.transformer.h) else None
        return cache.length if cache is not None else 0

    def forward(self, idx, targets=None, return_logits: bool = True, check_targets: bool = True):
        """Token ids (B, T) -> (logits (B, T, vocab_size) or None, loss or None).

        With targets, the loss is the mean cross-entropy over positions whose target
        is not -100. return_logits=False lets the triton backend skip materialising
        the (B*T, vocab) logits (fused linear + cross-entropy). Input ids are not
        range-checked here (that would be a host sync per call): the data loaders,
        generate() and the evaluation check the ids they feed in. A target outside
        the vocabulary is an error on every backend, as in F.cross_entropy; on the
        triton backend that check is a host sync, which check_targets=False skips
        (the trainer does: its loaders checked the ids).
        """
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise UserInputError(f"GPT.forward: idx must be a 2-D (B, T) tensor of token ids, got "
                                 f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise UserInputError(f"GPT.forward: idx must hold int64 or int32 token ids, got {idx.dtype}")
        if targets is not None and targets.shape != idx.shape:
            raise UserInputError(f"GPT.forward: targets shape {tuple(targets.shape)} != idx shape "
                                 f"{tuple(idx.shape)}")
        B, T = idx.shape
        start = self.cached_length()
        if start + T > self.config.block_size:
            raise UserInputError(f"GPT.forward: sequence of length {start + T} exceeds block_size "
                                 f"{self.config.block_size}")
        x = self.ops.embedding(idx, self.transformer.wte.weight, self.transformer.wpe.weight, start,
                               self.residual_dtype)
        residual = None
        for block in self.transformer.h:
            x, residual = block(x, residual)
        x, _ = self.transformer.ln_f(x, residual)

        V = self.config.vocab_size
        logits = loss = None
        if targets is not None:
            loss = self.ops.linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight,
                                                 targets.reshape(B * T).long(), num_classes=V,
                                                 check_targets=check_targets)
        if return_logits or targets is None:
            # Padded vocabulary rows are never part of the output, so never sampled.
            logits = self.lm_head(x)[..., :V]
        return logits, loss

    def matmul_weights(self) -> list[nn.Parameter]:
        """The weights that feed matmuls (the linear layers and the tied LM head):
        those with a bf16 copy under engine.weight_copies."""
        weights = [self.lm_head.weight]
        for block in self.transformer.h:
            weights += [block.attn.c_attn.weight, block.attn.c_proj.weight,
                        block.mlp.c_fc.weight, block.mlp.c_proj.weight]
        return weights

    def forward_backward(self, idx, targets, *, grad_scale: float = 1.0, autocast=contextlib.nullcontext,
                         check_targets: bool = True):
        """One training micro-step: loss = self(idx, targets, check_targets=...)[1]
        under `autocast()` (a zero-argument callable giving a context), then
        `loss.backward(gradient=grad_scale)`, outside autocast; returns the loss,
        detached. Parameters' gradients accumulate into .grad as with autograd.

        The training step calls this instead of forward and backward itself so
        that the kernels know the whole step: on the triton backend, with the
        config's fusions, weight gradients are added into .grad inside the
        kernels that compute them, the LM head takes its gradient for grad_scale
        in its forward, and under bf16 autocast the matmuls read
        `self.weight_copies`. Not for a model wrapped in DDP or FSDP (their
        gradient hooks would not see those gradients): call the wrapper and
        backward there.
        """
        with self.ops.training_step(grad_scale, self.weight_copies):
            with record_function("forward"), autocast():
                _, loss = self(idx, targets, return_logits=False, check_targets=check_targets)
        with record_function("backward"):
            loss.backward(torch.full_like(loss, grad_scale))
        return loss.detach()

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "GPT":
        """Load a GPT-2 checkpoint directory in Hugging Face format (config.json and
        model.safetensors or pytorch_model.bin), or this engine's run folder or
        checkpoint file. `overrides` set GPTConfig fields such as backend or
        vocab_multiple."""
        if source_kind(path) == "hf":
            return load_hf_folder(cls, path, **overrides)
        return load_engine_model(cls, path, **overrides)[0]

    def save_pretrained(self, path) -> None:
        """Write a directory that transformers.GPT2LMHeadModel.from_pretrained loads."""
        save_pretrained(self, path)
