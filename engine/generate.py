"""Sampling from a GPT: temperature, top-k, top-p, a seed, and a KV cache.

With the cache each new token runs the model on one position against the cached
keys and values (O(T) per token); without it, every token re-runs the whole
context. Both paths give the same tokens under one seed.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from engine.model import GPT


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus."""
    if top_k is not None:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_args(model, idx, max_new_tokens, temperature, top_k, top_p):
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError("generate: idx must be a (B, T) tensor of token ids with T >= 1")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if idx.size(1) > model.config.block_size:
        raise ValueError(f"generate: prompt length {idx.size(1)} exceeds block_size "
                         f"{model.config.block_size}")
    lo, hi = int(idx.min()), int(idx.max())  # the model itself does not range-check ids
    if lo < 0 or hi >= model.config.vocab_size:
        raise ValueError(f"generate: token id {lo if lo < 0 else hi} is outside the vocabulary "
                         f"[0, {model.config.vocab_size})")


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token: int | None = None, use_cache: bool = True,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Continue each row of `idx` (B, T) by up to `max_new_tokens` tokens.

    temperature=0 is greedy decoding. Sampling draws from a torch.Generator seeded
    with `seed` (fresh entropy when None). Generation stops early once every row has
    produced `eos_token`; rows that finished earlier are padded with it.
    The cache holds block_size positions; past that, it is primed again from the
    last block_size // 2 tokens (the uncached path slides a block_size window, so
    the two agree exactly only within block_size).
    `on_token`, when given, is called with each step's new tokens (B, 1) as soon
    as they are chosen (rows already finished get `eos_token`): for streaming.
    """
    _check_args(model, idx, max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=idx.device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    block = model.config.block_size
    # Under autocast the keys and values come out of the projections in the autocast dtype.
    device_type = idx.device.type
    cache_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                   else model.lm_head.weight.dtype)
    out = idx
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    caches = contextlib.ExitStack()
    try:
        cached = False
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = model(out[:, -block:])
            elif not cached or model.cached_length() >= block:
                # (Re)prime the caches: the whole prompt first, then, once they are
                # full, the last block_size // 2 tokens.
                caches.close()
                caches.enter_context(model.kv_caches(idx.size(0), cache_dtype))
                logits, _ = model(out[:, -(block // 2 if cached else block):])
                cached = True
            else:
                logits, _ = model(out[:, -1:])
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(-1, keepdim=True)
            else:
                # Shifted so the largest is 0, in float64: a tiny temperature then
                # sends the others to -inf (greedy in the limit), never to inf - inf = nan.
                scaled = (logits.double() - logits.amax(-1, keepdim=True).double()) / temperature
                probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator)
            if eos_token is not None:
                next_token = torch.where(finished[:, None], torch.full_like(next_token, eos_token), next_token)
                finished |= next_token[:, 0] == eos_token
            out = torch.cat([out, next_token], dim=1)
            if on_token is not None:
                on_token(next_token)
            if eos_token is not None and bool(finished.all()):
                break
    finally:
        caches.close()
        model.train(was_training)
    return out
