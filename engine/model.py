"""GPT-2, read top to bottom: attention, MLP, block, model.

Every op that a Triton kernel replaces goes through the op layer (`engine.ops`),
chosen per model by `GPTConfig.backend`. The state dict has the layout of
nanoGPT and (Conv1D transposed aside) of Hugging Face's GPT2LMHeadModel.
"""
from __future__ import annotations


import torch
import torch.nn as nn

from engine.config import GPTConfig
from engine.errors import UserInputError
from engine.ops import AutoOps, get_ops


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias; the op layer does the computing."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None


class KVCache:
    """Keys and values of every layer for positions already seen, preallocated to block_size."""

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far (shared by all layers)
        self.capacity = config.block_size


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, ops, kv_cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        qkv = self.c_attn(x)
        # (B, T, 3, H, D) viewed as three (B, H, T, D) tensors without copies: the
        # attention kernel takes arbitrary strides.
        q, k, v = qkv.view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        if kv_cache is not None:
            start = kv_cache.length
            kv_cache.k[layer, :, :, start:start + T] = k
            kv_cache.v[layer, :, :, start:start + T] = v
            k = kv_cache.k[layer, :, :, :start + T]
            v = kv_cache.v[layer, :, :, :start + T]
            if k.dtype != q.dtype:  # a cache kept in another precision than this forward's
                k, v = k.to(q.dtype), v.to(q.dtype)
        y = ops.attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, ops):
        return self.dropout(self.c_proj(ops.linear_gelu(x, self.c_fc.weight, self.c_fc.bias)))


class Block(nn.Module):
    """Pre-LN block. Its LayerNorms are applied by GPT.forward, which fuses each
    residual add into the LayerNorm that follows it (add_layer_norm)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.ops = get_ops(config.backend)
        # Checking token ids against the vocabulary reads them back to the host, a
        # sync per forward. The trainer turns it off: its data loader checks every
        # batch on the CPU before the copy to the device.
        self.validate_token_ids = True
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.apply(self._init_weights)

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

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied LM head counts once
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    def _check_inputs(self, idx, targets):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise UserInputError(f"GPT.forward: idx must be a 2-D (B, T) tensor of token ids, got "
                                 f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise UserInputError(f"GPT.forward: idx must hold int64 or int32 token ids, got {idx.dtype}")
        if targets is not None and targets.shape != idx.shape:
            raise UserInputError(f"GPT.forward: targets shape {tuple(targets.shape)} != idx shape "
                                 f"{tuple(idx.shape)}")
        if not self.validate_token_ids:
            return
        if idx.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return  # value checks sync with the host, which a CUDA graph cannot do
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise UserInputError(f"GPT.forward: token id {hi if hi >= self.config.vocab_size else lo} "
                                     f"is outside the vocabulary [0, {self.config.vocab_size})")
        if targets is not None and targets.numel():
            t = targets[targets != -100]
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.config.vocab_size):
                raise UserInputError(f"GPT.forward: a target id is outside the vocabulary "
                                     f"[0, {self.config.vocab_size}) (use -100 to ignore a position)")

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, return_logits: bool = True):
        """Token ids (B, T) -> (logits (B, T, vocab_size) or None, loss or None).

        With targets, the loss is the mean cross-entropy over positions whose target
        is not -100. return_logits=False lets the triton backend skip materialising
        the (B*T, vocab) logits (fused linear + cross-entropy).
        """
        self._check_inputs(idx, targets)
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise UserInputError(f"GPT.forward: sequence of length {start + T} exceeds block_size "
                                 f"{self.config.block_size}")
        ops, eps = self.ops, self.config.layer_norm_eps
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        h = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        blocks = self.transformer.h
        y = ops.layer_norm(h, blocks[0].ln_1.weight, blocks[0].ln_1.bias, eps)
        for i, block in enumerate(blocks):
            h, y = ops.add_layer_norm(h, block.attn(y, ops, kv_cache, i), block.ln_2.weight, block.ln_2.bias, eps)
            next_ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.transformer.ln_f
            h, y = ops.add_layer_norm(h, block.mlp(y, ops), next_ln.weight, next_ln.bias, eps)
        if kv_cache is not None:
            kv_cache.length += T

        V = self.config.vocab_size
        logits = loss = None
        if targets is not None:
            loss = ops.linear_cross_entropy(y.reshape(B * T, -1), self.lm_head.weight,
                                            targets.reshape(B * T).long(), num_classes=V)
        if return_logits or targets is None:
            # Padded vocabulary rows are never part of the output, so never sampled.
            logits = self.lm_head(y)[..., :V]
        return logits, loss

    # Hugging Face interop lives in engine.hf; these are the public entry points.
    @classmethod
    def from_pretrained(cls, path, **overrides) -> "GPT":
        """Load a GPT-2 checkpoint directory in Hugging Face format (config.json and
        model.safetensors or pytorch_model.bin). `overrides` set GPTConfig fields
        such as backend or vocab_multiple."""
        from engine.hf import load_pretrained
        return load_pretrained(cls, path, **overrides)

    def save_pretrained(self, path) -> None:
        """Write a directory that transformers.GPT2LMHeadModel.from_pretrained loads."""
        from engine.hf import save_pretrained
        save_pretrained(self, path)
