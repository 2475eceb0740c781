"""The work a call does, counted before anything is timed: the larger of FLOPs / peak
and bytes / bandwidth is the floor a measured time is compared with.

Attention FLOPs as FlashAttention counts them (forward 4*B*H*T*T*D, halved when
causal; backward 2.5x forward); training FLOPs per token as llm.c counts them
(6N + 6*L*C*T); how many input sets to rotate through so that timing never
reads its inputs out of a warm L2.
"""
from __future__ import annotations

import math

# The largest L2 of the GPUs we measure on (H200 and H100: 60 MB and 50 MB);
# inputs smaller than twice this are rotated.
L2_BYTES = 60 * 2 ** 20

ATTENTION_KIND_FACTORS = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, kind: str) -> float:
    """FLOPs of one attention call as FlashAttention counts them; kind: fwd, bwd or fwdbwd."""
    if kind not in ATTENTION_KIND_FACTORS:
        raise ValueError(f"attention_flops: kind must be fwd, bwd or fwdbwd, got {kind!r}")
    fwd = 4.0 * B * H * T * T * D
    if causal:
        fwd /= 2
    return fwd * ATTENTION_KIND_FACTORS[kind]


def matmul_flops(M: int, N: int, K: int) -> float:
    return 2.0 * M * N * K


def gpt_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token, llm.c's count: 6N for the matmuls of forward and
    backward, 6*L*C*T for attention (12*L*C*T halved by the causal mask)."""
    return 6.0 * n_params + 6.0 * n_layer * n_embd * seq_len


def rotation_count(bytes_per_set: int, limit: int = 8) -> int:
    """Input sets to rotate through so that consecutive calls do not find their
    inputs in L2: enough to span twice the L2, at most `limit`."""
    if bytes_per_set <= 0:
        return 1
    return max(1, min(limit, math.ceil(2 * L2_BYTES / bytes_per_set)))
