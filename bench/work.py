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


# The least bytes each benchmarked op must move (every operand read once, every
# result written once), shared by the comparisons (bench/cases.py) and the
# predictor (bench/predict.py).

def layernorm_bytes(rows: int, width: int, elem: int, fused: bool, grad: bool) -> float:
    """fwd reads x (and r), writes y (and h); bwd reads dy (dh) and the saved input,
    writes dx (d residual is the same tensor)."""
    moves = (4 if fused else 2) + ((4 if fused else 3) if grad else 0)
    return moves * rows * width * elem


def linear_gelu_work(M: int, K: int, N: int, elem: int, grad: bool) -> tuple[float, float]:
    """(FLOPs, bytes) of gelu(x @ W.T + b), forward or forward + backward."""
    times = 3 if grad else 1
    return matmul_flops(M, N, K) * times, (M * K + N * K + M * N) * elem * times


def mlp_work(M: int, C: int, H: int, N: int, elem: int, grad: bool) -> tuple[float, float]:
    """(FLOPs, bytes) of GPT-2's MLP (two matmuls: C -> H -> N), forward or forward + backward."""
    times = 3 if grad else 1
    flops = (matmul_flops(M, H, C) + matmul_flops(M, N, H)) * times
    moved = (M * C + H * C + M * H) + (M * H + N * H + M * N)
    return flops, moved * elem * times


def attention_bytes(B: int, H: int, T: int, D: int, elem: int, kind: str) -> float:
    """fwd reads q, k, v and writes o; the backward also reads o and do and writes dq, dk, dv."""
    return (4 if kind == "fwd" else 8) * B * H * T * D * elem


def cross_entropy_work(N: int, C: int, V: int, elem: int, grad: bool) -> tuple[float, float]:
    """(FLOPs, bytes) of the LM head and its loss without logits in memory: x and W read
    (and dx, dW written)."""
    return matmul_flops(N, V, C) * (3 if grad else 1), (N * C + V * C) * elem * (2 if grad else 1)


def adamw_bytes(numel: int) -> float:
    """fp32: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq."""
    return 7 * 4 * numel
