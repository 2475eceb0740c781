"""Fused scaled-dot-product attention (FlashAttention-2 style) in Triton.

    O = softmax(Q K^T * sm_scale + mask) V,   LSE_i = log2 sum_j 2^(S_ij * log2 e)

Forward: one program per (query block, batch*head) streams key/value blocks
through an online softmax (running max `m_i` and sum `l_i`, base-2 exponentials
with `sm_scale * log2(e)` folded into the scores) and writes the output once,
plus the per-row log-sum-exp (base 2) for the backward pass. Two kernels do it:

- `_attn_fwd_tma` (the default for 16-bit inputs on Hopper and newer): Q, K, V
  and O move by TMA through tensor descriptors built per (batch, head), so a
  tile arrives as one bulk copy and rows past the end read as zeros; and the
  loop is software pipelined by one block, FlashAttention-3's intra-warpgroup
  overlap: the iteration of key block j issues (and waits for) its scores
  Q K_j^T, then issues block j-1's P V, whose tensor-core work runs while
  block j's softmax does.
- `_attn_fwd` (pointer loads by `cp.async`, the two matmuls in turn): where
  TMA cannot serve the inputs (strides or data not 16-byte aligned), on GPUs
  before Hopper, for float32 on a GPU (its IEEE dots run on CUDA cores, not
  wgmma, so the pipelined loop gains nothing there, and the TMA kernels spill
  registers in float32), and on request (`tma=False`).

Backward, with P recomputed from the saved log-sum-exp:

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   delta_i = rowsum(dO * O)_i,
    dQ = dS K * sm_scale,   dK = dS^T Q * sm_scale

`delta` comes from a small preprocessing kernel; then one of two paths:

- atomic (the default where the TMA forward runs): one kernel,
  FlashAttention-2's own CUDA backward. Each program owns a key block, walks
  the query blocks that see it and does the 5 matmuls of a block pair (S, dV,
  dP, dK, dQ); its share of dQ is added with fp32 atomics into a zeroed buffer
  that a last kernel scales and casts. The order of those additions varies
  from run to run, so dQ does too (in its last bits); dK and dV do not.
- deterministic (`deterministic=True`, and wherever the pointer kernels run):
  one kernel where each program owns a key block (dK, dV) and one where each
  owns a query block and walks the key blocks it sees (dQ): 7 matmuls per
  block pair (S and dP are computed twice), no atomics, the same bits every run.

Nothing of size T x T is stored.

Causal masking is aligned to the END of the keys: query i of Tq sits at
absolute position Tk - Tq + i and sees keys 0 .. Tk - Tq + i (for Tq == Tk this
is the usual lower-triangular mask; for Tq < Tk it is what decoding with a KV
cache needs). The key blocks a query block visits are split as in Triton's
fused-attention tutorial: the blocks every row sees whole run without masks
(_STAGE_OFF_BAND), and only the rest -- the causal diagonal band (_STAGE_ON_BAND)
or, without causality, the ragged last block (_STAGE_NON_CAUSAL) -- is masked.

Dropout (as `F.scaled_dot_product_attention(dropout_p=p)`) applies to the
probabilities after the softmax, with a keep-mask M and scale 1 / (1 - p):

    O = (P * M) V / (1 - p),   dV = (P * M)^T dO / (1 - p),
    dS = P * (dP * M / (1 - p) - delta),   delta_i = rowsum(dO * O)_i (unchanged)

M is never stored: each kernel regenerates the entries it needs from Philox,
keyed by a seed read from a one-element device tensor and counting by the
element's (batch * head, query, key) index, so memory stays O(T) and the mask
does not depend on any kernel's tiles (every path draws the same mask). With
p = 0 the dropout code is compiled out (a constexpr), so that path is the plain
kernel, bit for bit.
"""
import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

from gpt2_kernels._common import (
    FLOAT_DTYPES,
    SMEM_BUDGET_BYTES,
    check_dropout_p,
    check_real,
    check_same_device,
    check_same_dtype,
    check_tensor,
    dropout_seed,
    interpreting,
    launch_autotuned,
    on_device,
    once_differentiable,
    pick,
    with_descriptor_scratch,
)

# 1 / ln(2): scores are scaled by sm_scale * LOG2E so the softmax can use exp2.
_LOG2E = 1.4426950408889634
_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
# Lengths and head counts change between calls; specialising on their value
# (== 1, divisible by 16) would only multiply compilations.
_VARYING_INTS = ["H", "Tq", "Tk", "TQ_KEY", "TK_KEY", "LSE_ROW"]

# Which part of the key range a loop walks (Triton's tutorial 06 calls it STAGE).
_STAGE_OFF_BAND = tl.constexpr(1)    # blocks every row of the query block sees whole: no mask
_STAGE_ON_BAND = tl.constexpr(2)     # the causal diagonal band: causal mask and key bound
_STAGE_NON_CAUSAL = tl.constexpr(3)  # without causality, the ragged last block: key bound only


# ----------------------------------------------------------------------------
# Helpers shared by the kernels
# ----------------------------------------------------------------------------
@triton.jit
def _load_rows(ptrs, rows_ok, MASKED: tl.constexpr):
    """A [rows, HEAD_DIM] tile; rows outside the tensor read as zeros when MASKED."""
    if MASKED:
        return tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _operand(x, PRECISION: tl.constexpr):
    """A loaded Q, K, V or dO tile as the kernels' dot operand: in fp32 where
    the dots are IEEE fp32 (a no-op for fp32 inputs; bf16 under the
    interpreter, whose bf16 dots multiply raw bits, is given IEEE dots)."""
    if PRECISION == "ieee":
        return x.to(tl.float32)
    return x


@triton.jit
def _key_split(start_m, Tq, Tk, CAUSAL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query block at start_m: keys [0, full) form whole blocks that
    every row of the block sees (_STAGE_OFF_BAND); keys [full, end) are the rest
    it sees in part (_STAGE_ON_BAND when causal, else _STAGE_NON_CAUSAL)."""
    if CAUSAL:
        # The first row sits at absolute position Tk - Tq + start_m and sees
        # keys up to it; the last row sees up to BLOCK_M - 1 further.
        shift = Tk - Tq
        full = ((shift + start_m + 1) // BLOCK_N) * BLOCK_N
        end = tl.minimum(shift + start_m + BLOCK_M, Tk)
    else:
        full = (Tk // BLOCK_N) * BLOCK_N
        end = Tk
    return full, end


@triton.jit
def _query_split(start_n, Tq, Tk, CAUSAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the key block at start_n, the query blocks that see it: [lo, full)
    in part (the causal diagonal band; empty without causality), [full, Tq)
    whole. Also the causal shift Tk - Tq (0 without causality)."""
    if CAUSAL:
        shift = Tk - Tq
        # First query that sees key start_n, rounded down to a block; queries
        # from `full` on see every key of this block.
        lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
        full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        full = tl.minimum(full, Tq)
    else:
        shift = 0
        lo = 0
        full = 0
    return lo, full, shift


@triton.jit
def _visible(q_pos, k_pos, Tk, STAGE: tl.constexpr):
    """[queries, keys] mask of the scores a masked stage keeps."""
    if STAGE == _STAGE_ON_BAND:
        return k_pos[None, :] <= q_pos[:, None]
    else:
        return (k_pos < Tk)[None, :]


@triton.jit
def _dropout_keep(seed, bh, q_idx, k_idx, dropout_p):
    """Which attention probabilities dropout keeps: for head bh (batch * H +
    head) and the scores of queries q_idx against keys k_idx (broadcast
    against each other), one Philox-4x32-10 draw keyed by seed with counter
    (key, query, head, 0), kept when its first word as a uniform in [0, 1) is
    at least dropout_p. A function of the element alone, so the backward
    regenerates the forward's mask whatever the tiles of either."""
    zero = tl.zeros_like(q_idx + k_idx)
    r, _, _, _ = tl.philox(seed, k_idx + zero, q_idx + zero, bh + zero, zero)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _program_block(length, H, BLOCK: tl.constexpr, LAST_FIRST: tl.constexpr):
    """This program's (batch*head, block start, batch, head) on the one flat
    grid axis (no 65535 limit on B*H): cdiv(length, BLOCK) blocks per head,
    last-first within a head with LAST_FIRST (causal query blocks: the longest
    programs start first and the short ones fill the tail)."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(length, BLOCK)
    off_hz = pid // num_blocks
    if LAST_FIRST:
        start = (num_blocks - 1 - pid % num_blocks) * BLOCK
    else:
        start = (pid % num_blocks) * BLOCK
    return off_hz, start, (off_hz // H).to(tl.int64), (off_hz % H).to(tl.int64)


@triton.jit
def _softmax_step(s, m_i, l_i, q_pos, k_pos, Tk, STAGE: tl.constexpr):
    """The online softmax's update for one block of scaled scores s: returns
    (p, alpha, m, l) with p = 2^(s - m) for the new running max m, alpha the
    factor that rescales what was accumulated under the old max, and l the
    updated row sums."""
    if STAGE != _STAGE_OFF_BAND:
        s = tl.where(_visible(q_pos, k_pos, Tk, STAGE), s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        # A row with every key masked so far keeps m = -inf; subtracting a
        # finite stand-in gives exp2(-inf) = 0 instead of NaN.
        m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    else:
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_ij
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_ij, l_i


@triton.jit
def _finish_rows(acc, l_i, m_i, dropout_p, DROPOUT: tl.constexpr):
    """O = acc / l (times 1 / (1 - p) with dropout) and the base-2 LSE. Rows
    that saw no key at all (only padding rows can) get O = 0 and LSE = +inf,
    which makes their recomputed P exactly 0 in the backward."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    return acc, tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))


# ----------------------------------------------------------------------------
# Forward, pointer loads
# ----------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_blk, v_blk, k_offs, v_offs, k_step, v_step,
                    lo, hi, qk_scale, q_pos, offs_n, Tk, seed, bh, q_idx, dropout_p,
                    STAGE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                    DROPOUT: tl.constexpr):
    # k_blk, v_blk: scalar pointers to key `lo`, returned pointing at key `hi`
    # so the next stage continues where this one stopped. Only these scalars
    # are carried through the loop, not a tile of 64-bit pointers (which, at
    # 64 per thread, made ptxas of Triton 3.6 spill).
    MASKED: tl.constexpr = STAGE != _STAGE_OFF_BAND
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n
        k = _operand(_load_rows(k_blk + k_offs, k_pos < Tk, MASKED), PRECISION)
        v = _operand(_load_rows(v_blk + v_offs, k_pos < Tk, MASKED), PRECISION)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, q_pos, k_pos, Tk, STAGE)
        acc = acc * alpha[:, None]
        if DROPOUT:
            # The softmax sums every probability; only O sees the dropped ones
            # zeroed (the 1 / (1 - p) comes once, at the end).
            p = tl.where(_dropout_keep(seed, bh, q_idx[:, None], k_pos[None, :], dropout_p), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        k_blk += k_step
        v_blk += v_step
    return acc, l_i, m_i, k_blk, v_blk


@triton.jit(do_not_specialize=_VARYING_INTS)
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              H, Tq, Tk, TQ_KEY, TK_KEY, LSE_ROW, qk_scale, SEED, dropout_p,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    off_hz, start_m, off_b, off_h = _program_block(Tq, H, BLOCK_M, True)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # Block origins go into the base pointers in int64; the offsets inside a
    # tile stay small int32.
    q_base = Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qm
    k_blk = K + off_b * stride_kb + off_h * stride_kh
    v_blk = V + off_b * stride_vb + off_h * stride_vh
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    k_step = tl.cast(stride_kn, tl.int64) * BLOCK_N
    v_step = tl.cast(stride_vn, tl.int64) * BLOCK_N

    row_ok = (start_m + offs_m) < Tq
    q = _operand(tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                         mask=row_ok[:, None], other=0.0), PRECISION)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Absolute position of each query (keys are numbered from 0).
    q_pos = start_m + offs_m + (Tk - Tq if CAUSAL else 0)
    seed = tl.load(SEED) if DROPOUT else 0
    full, end = _key_split(start_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i, k_blk, v_blk = _attn_fwd_inner(
        acc, l_i, m_i, q, k_blk, v_blk, k_offs, v_offs, k_step, v_step, 0, full, qk_scale,
        q_pos, offs_n, Tk, seed, off_hz, start_m + offs_m, dropout_p,
        _STAGE_OFF_BAND, BLOCK_N, PRECISION, DROPOUT)
    acc, l_i, m_i, k_blk, v_blk = _attn_fwd_inner(
        acc, l_i, m_i, q, k_blk, v_blk, k_offs, v_offs, k_step, v_step, full, end, qk_scale,
        q_pos, offs_n, Tk, seed, off_hz, start_m + offs_m, dropout_p,
        _STAGE_ON_BAND if CAUSAL else _STAGE_NON_CAUSAL, BLOCK_N, PRECISION, DROPOUT)

    acc, lse = _finish_rows(acc, l_i, m_i, dropout_p, DROPOUT)
    o_base = O + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_om
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse_base = LSE + off_hz.to(tl.int64) * LSE_ROW + start_m
    tl.store(lse_base + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------
# Forward, TMA loads and the softmax overlapped with P V
# ----------------------------------------------------------------------------
@triton.jit
def _head_desc(base, rows, row_stride, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A TMA descriptor over one head's (rows, HEAD_DIM) matrix, BLOCK rows per
    copy; rows past the end read as zeros and are dropped when stored."""
    return tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[row_stride, 1],
                                     block_shape=[BLOCK, HEAD_DIM])


@triton.jit
def _row_desc(base, n, row_stride, BLOCK: tl.constexpr):
    """A TMA descriptor over n values as a one-row matrix (descriptors have two
    dimensions or more), BLOCK values per copy, zeros past the end."""
    return tl.make_tensor_descriptor(base, shape=[1, n], strides=[row_stride, 1],
                                     block_shape=[1, BLOCK])


@triton.jit
def _softmax_block(s, m_i, l_i, q_pos, k_pos, Tk, seed, bh, q_idx, dropout_p,
                   STAGE: tl.constexpr, DROPOUT: tl.constexpr, OPERAND: tl.constexpr):
    """`_softmax_step` and dropout for one block, P returned as the raw bits
    of the P V operand (see `_attn_fwd_tma_inner`)."""
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, q_pos, k_pos, Tk, STAGE)
    if DROPOUT:
        p = tl.where(_dropout_keep(seed, bh, q_idx[:, None], k_pos[None, :], dropout_p), p, 0.0)
    bits: tl.constexpr = tl.int16 if OPERAND.primitive_bitwidth == 16 else tl.int32
    return p.to(OPERAND).to(bits, bitcast=True), alpha, m_i, l_i


@triton.jit
def _attn_fwd_tma_inner(acc, l_i, m_i, p, alpha, q, k_desc, v_desc, lo, hi, qk_scale, q_pos,
                        offs_n, Tk, seed, bh, q_idx, dropout_p,
                        STAGE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                        DROPOUT: tl.constexpr):
    # Key blocks lo .. hi, one block behind in P V: entering, p holds the
    # probabilities of block lo - BLOCK_N, whose P V is still to do (acc and
    # alpha the same block's). The P V dot is issued after this block's scores
    # and is not waited for before the softmax: Triton makes a wgmma
    # asynchronous when nothing in the iteration reads its result, and waits
    # for it at the next iteration's scores. p crosses iterations as integer
    # bits: a dot operand that is a loop-carried tensor would be staged
    # through shared memory, and such a dot is waited for at once.
    for start_n in range(lo, hi, BLOCK_N):
        k = _operand(k_desc.load([start_n, 0]), PRECISION)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        v = _operand(v_desc.load([start_n - BLOCK_N, 0]), PRECISION)
        acc = tl.dot(p.to(v.dtype, bitcast=True), v, acc * alpha[:, None],
                     input_precision=PRECISION)
        p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, q_pos, start_n + offs_n, Tk, seed, bh,
                                            q_idx, dropout_p, STAGE, DROPOUT, v.dtype)
    return acc, l_i, m_i, p, alpha


@triton.jit(do_not_specialize=_VARYING_INTS)
def _attn_fwd_tma(Q, K, V, O, LSE,
                  stride_qb, stride_qh, stride_qm,
                  stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn,
                  stride_ob, stride_oh, stride_om,
                  H, Tq, Tk, TQ_KEY, TK_KEY, LSE_ROW, qk_scale, SEED, dropout_p,
                  HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    off_hz, start_m, off_b, off_h = _program_block(Tq, H, BLOCK_M, True)
    q_desc = _head_desc(Q + off_b * stride_qb + off_h * stride_qh, Tq, stride_qm, BLOCK_M, HEAD_DIM)
    k_desc = _head_desc(K + off_b * stride_kb + off_h * stride_kh, Tk, stride_kn, BLOCK_N, HEAD_DIM)
    v_desc = _head_desc(V + off_b * stride_vb + off_h * stride_vh, Tk, stride_vn, BLOCK_N, HEAD_DIM)
    o_desc = _head_desc(O + off_b * stride_ob + off_h * stride_oh, Tq, stride_om, BLOCK_M, HEAD_DIM)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q_pos = start_m + offs_m + (Tk - Tq if CAUSAL else 0)
    q_idx = start_m + offs_m
    seed = tl.load(SEED) if DROPOUT else 0
    MASKED_STAGE: tl.constexpr = _STAGE_ON_BAND if CAUSAL else _STAGE_NON_CAUSAL
    q = _operand(q_desc.load([start_m, 0]), PRECISION)
    full, end = _key_split(start_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)

    # Key block 0, peeled: its softmax (masked: it may be the band or the
    # ragged end) starts the pipeline; its P V comes in the loop.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k = _operand(k_desc.load([0, 0]), PRECISION)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, q_pos, offs_n, Tk, seed, off_hz, q_idx,
                                        dropout_p, MASKED_STAGE, DROPOUT, k.dtype)
    acc, l_i, m_i, p, alpha = _attn_fwd_tma_inner(
        acc, l_i, m_i, p, alpha, q, k_desc, v_desc, BLOCK_N, full, qk_scale, q_pos, offs_n, Tk,
        seed, off_hz, q_idx, dropout_p, _STAGE_OFF_BAND, BLOCK_N, PRECISION, DROPOUT)
    acc, l_i, m_i, p, alpha = _attn_fwd_tma_inner(
        acc, l_i, m_i, p, alpha, q, k_desc, v_desc, tl.maximum(full, BLOCK_N), end, qk_scale,
        q_pos, offs_n, Tk, seed, off_hz, q_idx, dropout_p, MASKED_STAGE, BLOCK_N, PRECISION,
        DROPOUT)
    # The last block's P V.
    v = _operand(v_desc.load([(tl.cdiv(end, BLOCK_N) - 1) * BLOCK_N, 0]), PRECISION)
    acc = tl.dot(p.to(v.dtype, bitcast=True), v, acc * alpha[:, None], input_precision=PRECISION)

    acc, lse = _finish_rows(acc, l_i, m_i, dropout_p, DROPOUT)
    o_desc.store([start_m, 0], acc.to(O.dtype.element_ty))
    tl.store(LSE + off_hz.to(tl.int64) * LSE_ROW + q_idx, lse, mask=q_idx < Tq)


# ----------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", "Tq", "LSE_ROW"])
def _attn_bwd_preprocess(O, DO, DELTA, DQ_ACC,
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_db, stride_dh, stride_dm, stride_dd,
                         H, Tq, LSE_ROW,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ZERO_DQ: tl.constexpr):
    """delta = rowsum(dO * O); with ZERO_DQ also zeroes the rows' fp32 dQ
    accumulator (B * H, Tq, HEAD_DIM), which the atomic backward adds into."""
    off_hz, start_m, off_b, off_h = _program_block(Tq, H, BLOCK_M, False)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (start_m + offs_m) < Tq
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_om \
        + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    do_ptrs = DO + off_b * stride_db + off_h * stride_dh + start_m.to(tl.int64) * stride_dm \
        + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd
    o = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    tl.store(DELTA + off_hz.to(tl.int64) * LSE_ROW + start_m + offs_m, delta, mask=row_ok)
    if ZERO_DQ:
        rows = off_hz.to(tl.int64) * Tq + start_m + offs_m
        tl.store(DQ_ACC + rows[:, None] * HEAD_DIM + offs_d[None, :],
                 tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), mask=row_ok[:, None])


@triton.jit
def _attn_bwd_pair(dk, dv, k, v, q, do, lse, delta, qk_scale, k_pos, start_m, offs_m, shift, seed,
                   bh, dropout_p, STAGE: tl.constexpr, PRECISION: tl.constexpr,
                   DROPOUT: tl.constexpr):
    """One (key block, query block) pair, scores transposed (keys x queries) so
    dK and dV accumulate with plain dots: adds the pair's share to dK and dV
    and returns dS^T (without sm_scale, fp32). Query rows past
    the end come with lse = +inf (pointer loads) or with zero q and dO (TMA):
    either way their share is zero."""
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    p_t = tl.math.exp2(s_t - lse[None, :])
    if STAGE == _STAGE_ON_BAND:
        p_t = tl.where(k_pos[:, None] <= (shift + start_m + offs_m)[None, :], p_t, 0.0)
    if DROPOUT:
        # dV sums the kept probabilities (scaled once, at the end); dP flows
        # back only through kept ones, scaled by 1 / (1 - p).
        keep_t = _dropout_keep(seed, bh, (start_m + offs_m)[None, :], k_pos[:, None], dropout_p)
        dv = tl.dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dp_t = tl.where(keep_t, dp_t * (1.0 / (1.0 - dropout_p)), 0.0)
    else:
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv, ds_t


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_blk, do_blk, q_offs, do_offs, q_step, do_step,
                         lse_ptrs, delta_ptrs, lo, hi, qk_scale, k_pos, offs_m, Tq, shift,
                         seed, bh, dropout_p,
                         STAGE: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
                         DROPOUT: tl.constexpr):
    # Query rows are always bounds-masked: both stages may end in the ragged
    # last query block.
    for start_m in range(lo, hi, BLOCK_M):
        row_ok = (start_m + offs_m) < Tq
        q = _operand(_load_rows(q_blk + q_offs, row_ok, True), PRECISION)
        do = _operand(_load_rows(do_blk + do_offs, row_ok, True), PRECISION)
        # +inf for padding rows makes their P exactly zero without a mask.
        lse = tl.load(lse_ptrs + start_m + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptrs + start_m + offs_m, mask=row_ok, other=0.0)
        dk, dv, _ = _attn_bwd_pair(dk, dv, k, v, q, do, lse, delta, qk_scale, k_pos, start_m,
                                   offs_m, shift, seed, bh, dropout_p, STAGE, PRECISION, DROPOUT)
        q_blk += q_step
        do_blk += do_step
    return dk, dv, q_blk, do_blk


@triton.jit(do_not_specialize=_VARYING_INTS)
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   H, Tq, Tk, TQ_KEY, TK_KEY, LSE_ROW, qk_scale, sm_scale, SEED, dropout_p,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Early key blocks are seen by the most queries under causal masking:
    # start those first.
    off_hz, start_n, off_b, off_h = _program_block(Tk, H, BLOCK_N, False)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_pos = start_n + offs_n
    col_ok = k_pos < Tk
    k = _operand(_load_rows(K + off_b * stride_kb + off_h * stride_kh
                            + start_n.to(tl.int64) * stride_kn + offs_n[:, None] * stride_kn
                            + offs_d[None, :] * stride_kd, col_ok, True), PRECISION)
    v = _operand(_load_rows(V + off_b * stride_vb + off_h * stride_vh
                            + start_n.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn
                            + offs_d[None, :] * stride_vd, col_ok, True), PRECISION)

    m_lo, m_full, shift = _query_split(start_n, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    m_lo64 = tl.cast(m_lo, tl.int64)
    q_blk = Q + off_b * stride_qb + off_h * stride_qh + m_lo64 * stride_qm
    do_blk = DO + off_b * stride_dob + off_h * stride_doh + m_lo64 * stride_dom
    q_offs = offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_offs = offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    q_step = tl.cast(stride_qm, tl.int64) * BLOCK_M
    do_step = tl.cast(stride_dom, tl.int64) * BLOCK_M
    lse_ptrs = LSE + off_hz.to(tl.int64) * LSE_ROW
    delta_ptrs = DELTA + off_hz.to(tl.int64) * LSE_ROW

    seed = tl.load(SEED) if DROPOUT else 0
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # The diagonal band (causal only; empty otherwise), then the query blocks
    # that see the whole key block.
    dk, dv, q_blk, do_blk = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_blk, do_blk, q_offs, do_offs, q_step, do_step, lse_ptrs, delta_ptrs,
        m_lo, m_full, qk_scale, k_pos, offs_m, Tq, shift, seed, off_hz, dropout_p,
        _STAGE_ON_BAND, BLOCK_M, PRECISION, DROPOUT)
    dk, dv, q_blk, do_blk = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_blk, do_blk, q_offs, do_offs, q_step, do_step, lse_ptrs, delta_ptrs,
        m_full, Tq, qk_scale, k_pos, offs_m, Tq, shift, seed, off_hz, dropout_p,
        _STAGE_OFF_BAND, BLOCK_M, PRECISION, DROPOUT)

    dk = dk * sm_scale
    if DROPOUT:
        dv = dv * (1.0 / (1.0 - dropout_p))
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + start_n.to(tl.int64) * stride_dkn
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + start_n.to(tl.int64) * stride_dvn
             + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_blk, v_blk, k_offs, v_offs, k_step, v_step,
                       lo, hi, qk_scale, q_pos, offs_n, Tk, seed, bh, q_idx, dropout_p,
                       STAGE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                       DROPOUT: tl.constexpr):
    MASKED: tl.constexpr = STAGE != _STAGE_OFF_BAND
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n
        k = _operand(_load_rows(k_blk + k_offs, k_pos < Tk, MASKED), PRECISION)
        v = _operand(_load_rows(v_blk + v_offs, k_pos < Tk, MASKED), PRECISION)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(q_pos, k_pos, Tk, STAGE), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, q_idx[:, None], k_pos[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
        k_blk += k_step
        v_blk += v_step
    return dq, k_blk, v_blk


@triton.jit(do_not_specialize=_VARYING_INTS)
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 H, Tq, Tk, TQ_KEY, TK_KEY, LSE_ROW, qk_scale, sm_scale, SEED, dropout_p,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    off_hz, start_m, off_b, off_h = _program_block(Tq, H, BLOCK_M, True)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (start_m + offs_m) < Tq
    start_m64 = start_m.to(tl.int64)
    q = _operand(_load_rows(Q + off_b * stride_qb + off_h * stride_qh + start_m64 * stride_qm
                            + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, row_ok,
                            True), PRECISION)
    do = _operand(_load_rows(DO + off_b * stride_dob + off_h * stride_doh + start_m64 * stride_dom
                             + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, row_ok,
                             True), PRECISION)
    row_base = off_hz.to(tl.int64) * LSE_ROW + start_m
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)

    k_blk = K + off_b * stride_kb + off_h * stride_kh
    v_blk = V + off_b * stride_vb + off_h * stride_vh
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    k_step = tl.cast(stride_kn, tl.int64) * BLOCK_N
    v_step = tl.cast(stride_vn, tl.int64) * BLOCK_N

    q_pos = start_m + offs_m + (Tk - Tq if CAUSAL else 0)
    full, end = _key_split(start_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    seed = tl.load(SEED) if DROPOUT else 0
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq, k_blk, v_blk = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_blk, v_blk, k_offs, v_offs, k_step, v_step, 0, full, qk_scale,
        q_pos, offs_n, Tk, seed, off_hz, start_m + offs_m, dropout_p,
        _STAGE_OFF_BAND, BLOCK_N, PRECISION, DROPOUT)
    dq, k_blk, v_blk = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_blk, v_blk, k_offs, v_offs, k_step, v_step, full, end, qk_scale,
        q_pos, offs_n, Tk, seed, off_hz, start_m + offs_m, dropout_p,
        _STAGE_ON_BAND if CAUSAL else _STAGE_NON_CAUSAL, BLOCK_N, PRECISION, DROPOUT)

    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + start_m64 * stride_dqm
             + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_bwd_atomic_inner(dk, dv, k, v, q_desc, do_desc, lse_desc, delta_desc, dq_acc, dq_offs,
                           lo, hi, qk_scale, k_pos, offs_m, Tq, shift, seed, bh, dropout_p,
                           STAGE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                           PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        q = _operand(q_desc.load([start_m, 0]), PRECISION)
        do = _operand(do_desc.load([start_m, 0]), PRECISION)
        lse = lse_desc.load([0, start_m]).reshape([BLOCK_M])
        delta = delta_desc.load([0, start_m]).reshape([BLOCK_M])
        dk, dv, ds_t = _attn_bwd_pair(dk, dv, k, v, q, do, lse, delta, qk_scale, k_pos, start_m,
                                      offs_m, shift, seed, bh, dropout_p, STAGE, PRECISION, DROPOUT)
        # The 5th matmul: this key block's share of the query block's dQ.
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION)
        tl.atomic_add(dq_acc + tl.cast(start_m, tl.int64) * HEAD_DIM + dq_offs, dq,
                      mask=((start_m + offs_m) < Tq)[:, None], sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=_VARYING_INTS)
def _attn_bwd_atomic(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC,
                     stride_qb, stride_qh, stride_qm,
                     stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     stride_dob, stride_doh, stride_dom,
                     stride_dkb, stride_dkh, stride_dkn,
                     stride_dvb, stride_dvh, stride_dvn,
                     H, Tq, Tk, TQ_KEY, TK_KEY, LSE_ROW, qk_scale, sm_scale, SEED, dropout_p,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    off_hz, start_n, off_b, off_h = _program_block(Tk, H, BLOCK_N, False)
    q_desc = _head_desc(Q + off_b * stride_qb + off_h * stride_qh, Tq, stride_qm, BLOCK_M, HEAD_DIM)
    do_desc = _head_desc(DO + off_b * stride_dob + off_h * stride_doh, Tq, stride_dom, BLOCK_M,
                         HEAD_DIM)
    k_desc = _head_desc(K + off_b * stride_kb + off_h * stride_kh, Tk, stride_kn, BLOCK_N, HEAD_DIM)
    v_desc = _head_desc(V + off_b * stride_vb + off_h * stride_vh, Tk, stride_vn, BLOCK_N, HEAD_DIM)
    dk_desc = _head_desc(DK + off_b * stride_dkb + off_h * stride_dkh, Tk, stride_dkn, BLOCK_N,
                         HEAD_DIM)
    dv_desc = _head_desc(DV + off_b * stride_dvb + off_h * stride_dvh, Tk, stride_dvn, BLOCK_N,
                         HEAD_DIM)
    # This head's LSE and delta as one-row matrices: BLOCK_M values per bulk
    # copy, zeros past Tq (as are those rows' q and dO).
    lse_desc = _row_desc(LSE + off_hz.to(tl.int64) * LSE_ROW, Tq, LSE_ROW, BLOCK_M)
    delta_desc = _row_desc(DELTA + off_hz.to(tl.int64) * LSE_ROW, Tq, LSE_ROW, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    dq_acc = DQ_ACC + off_hz.to(tl.int64) * Tq * HEAD_DIM
    dq_offs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]

    k_pos = start_n + offs_n
    k = _operand(k_desc.load([start_n, 0]), PRECISION)
    v = _operand(v_desc.load([start_n, 0]), PRECISION)
    m_lo, m_full, shift = _query_split(start_n, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    seed = tl.load(SEED) if DROPOUT else 0
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk, dv = _attn_bwd_atomic_inner(
        dk, dv, k, v, q_desc, do_desc, lse_desc, delta_desc, dq_acc, dq_offs, m_lo, m_full,
        qk_scale, k_pos, offs_m, Tq, shift, seed, off_hz, dropout_p,
        _STAGE_ON_BAND, BLOCK_M, HEAD_DIM, PRECISION, DROPOUT)
    dk, dv = _attn_bwd_atomic_inner(
        dk, dv, k, v, q_desc, do_desc, lse_desc, delta_desc, dq_acc, dq_offs, m_full, Tq,
        qk_scale, k_pos, offs_m, Tq, shift, seed, off_hz, dropout_p,
        _STAGE_OFF_BAND, BLOCK_M, HEAD_DIM, PRECISION, DROPOUT)

    dk = dk * sm_scale
    if DROPOUT:
        dv = dv * (1.0 / (1.0 - dropout_p))
    dk_desc.store([start_n, 0], dk.to(DK.dtype.element_ty))
    dv_desc.store([start_n, 0], dv.to(DV.dtype.element_ty))


@triton.jit(do_not_specialize=["H", "Tq"])
def _attn_bwd_dq_store(DQ_ACC, DQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd, H, Tq, sm_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """dQ = sm_scale * the atomic backward's fp32 sums, in dQ's dtype and strides."""
    off_hz, start_m, off_b, off_h = _program_block(Tq, H, BLOCK_M, False)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (start_m + offs_m) < Tq
    rows = off_hz.to(tl.int64) * Tq + start_m + offs_m
    dq = tl.load(DQ_ACC + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None])
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + start_m.to(tl.int64) * stride_dqm
             + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------
# Tile configurations
# ----------------------------------------------------------------------------
class _Tile(NamedTuple):
    """One kernel's launch shape. BLOCK_M counts queries, BLOCK_N keys."""
    block_m: int
    block_n: int
    num_stages: int
    num_warps: int
    # The largest head dim it is offered for: above it, its accumulators no
    # longer fit in registers and the main loop spills.
    max_head_dim: int = max(_SUPPORTED_HEAD_DIMS)
    # The same with dropout, whose Philox draws need registers of their own
    # (None: as without; 0: never offered with dropout).
    dropout_max_head_dim: int | None = None

    def launch_shape(self):
        return self.block_m, self.block_n, self.num_stages, self.num_warps

    def offered(self, head_dim, dropout):
        limit = self.max_head_dim
        if dropout and self.dropout_max_head_dim is not None:
            limit = self.dropout_max_head_dim
        return head_dim <= limit


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """Fixed tiles for the kernels, replacing the autotuner (tests only); a
    kernel left None keeps its autotuner (the interpreter's tile there)."""
    fwd: _Tile | None = None
    dkdv: _Tile | None = None
    dq: _Tile | None = None
    fwd_tma: _Tile | None = None
    bwd_atomic: _Tile | None = None


# The interpreter runs exactly one small tile per kernel (it cannot autotune,
# and small tiles keep it fast); BLOCK_M != BLOCK_N on purpose, so the stage
# boundaries are exercised the way the GPU's unequal tiles use them.
_INTERPRETER_TILES = _Tiles(fwd=_Tile(32, 16, 1, 4), dkdv=_Tile(16, 32, 1, 4), dq=_Tile(32, 16, 1, 4),
                            fwd_tma=_Tile(32, 16, 1, 4), bwd_atomic=_Tile(16, 32, 1, 4))

# Hopper: 128-row query tiles feed wgmma; 64-wide key tiles keep the softmax
# registers in budget; small BLOCK_M covers decoding. Every 16-bit tile here
# compiles for sm_90 without a spill in its main loop up to its max_head_dim
# (dropout_max_head_dim with dropout), with Triton 3.6 and 3.9: `python -m
# bench.compile_check` checks it. At D=128 a 4-warp program cannot hold a
# 128x128 fp32 accumulator (128 registers per thread) beside its scores, so
# the wide 4-warp tiles stop at D=64; dropout's Philox draws cost the widest
# tiles their place.
_FWD_TILES = (
    _Tile(128, 64, 3, 4, max_head_dim=64, dropout_max_head_dim=0), _Tile(128, 64, 4, 8),
    _Tile(128, 128, 3, 8, dropout_max_head_dim=0), _Tile(128, 32, 4, 4, dropout_max_head_dim=64),
    _Tile(64, 64, 4, 4, dropout_max_head_dim=64), _Tile(64, 32, 3, 4), _Tile(16, 64, 3, 4),
    _Tile(16, 128, 3, 4))
# dK/dV: a program owns BLOCK_N keys and walks BLOCK_M-query steps; it holds
# two BLOCK_N x D fp32 accumulators (dK, dV), hence 8 warps for the wide ones.
_DKDV_TILES = (
    _Tile(32, 128, 4, 8), _Tile(64, 128, 3, 8, max_head_dim=64, dropout_max_head_dim=0),
    _Tile(64, 64, 3, 8, dropout_max_head_dim=64), _Tile(32, 64, 3, 8),
    _Tile(64, 64, 3, 4, max_head_dim=64, dropout_max_head_dim=0),
    _Tile(32, 64, 4, 4, max_head_dim=64), _Tile(16, 64, 3, 4))
# dQ: a program owns BLOCK_M queries and walks BLOCK_N-key steps.
_DQ_TILES = (
    _Tile(128, 32, 3, 4, max_head_dim=64), _Tile(128, 32, 4, 8), _Tile(128, 64, 3, 8),
    _Tile(64, 64, 3, 4, dropout_max_head_dim=64), _Tile(64, 32, 4, 4), _Tile(16, 64, 3, 4))
# float32 uses IEEE dots, which run on CUDA cores with both operands in
# registers: the 16-bit tiles spill there by kilobytes and take up to 80 s to
# compile. These small tiles need no spill at D=64; at D=128 some spill (the
# compile check reports float32 spills without judging them: float32 is the
# exact reference path, not the fast one).
_FWD_TILES_FP32 = tuple(_Tile(*t) for t in [(16, 64, 3, 4), (16, 32, 3, 8), (32, 32, 3, 8),
                                           (64, 32, 3, 8)])
_DKDV_TILES_FP32 = tuple(_Tile(*t) for t in [(16, 32, 3, 8), (16, 32, 3, 4), (32, 32, 3, 8),
                                            (16, 64, 3, 8)])
_DQ_TILES_FP32 = tuple(_Tile(*t) for t in [(16, 32, 3, 8), (32, 32, 3, 8), (64, 32, 3, 8),
                                          (16, 64, 3, 4)])
# The TMA forward: BLOCK_M of 64 or more, so that both matmuls run on wgmma
# (whose asynchrony the pipelined loop exists for); a decoding query block
# wastes rows of Q but not memory traffic, which is what bounds it. The loop
# holds two P tiles (the one whose P V is in flight, in 16 bits, and the new
# one) beside the scores and the accumulator, so registers run out sooner
# than in the pointer forward: the 4-warp 128-row tiles and the 128-key tiles
# stop at D=64 without dropout, and with dropout at D=128 only the 64x32 and
# 8-warp 64x64 tiles are free of spills (on Triton 3.6 and 3.9 alike).
_FWD_TMA_TILES = (
    _Tile(128, 64, 3, 4, max_head_dim=64, dropout_max_head_dim=0),
    _Tile(128, 64, 3, 8, dropout_max_head_dim=64),
    _Tile(128, 128, 3, 8, max_head_dim=64, dropout_max_head_dim=0),
    _Tile(64, 64, 3, 4, dropout_max_head_dim=64), _Tile(64, 64, 3, 8), _Tile(64, 32, 3, 4))
# The atomic backward: a program owns BLOCK_N keys (the dK, dV accumulators)
# and walks BLOCK_M-query steps, holding each step's dQ share beside them:
# 64-query steps fit at D=64 without dropout, 32-query steps up to D=64 with
# dropout (and at D=128 without it on 8 warps), and at D=128 with dropout only
# the 8-warp 16x64 tile is free of spills on both Tritons.
_BWD_ATOMIC_TILES = (
    _Tile(64, 128, 2, 8, max_head_dim=64, dropout_max_head_dim=0),
    _Tile(64, 64, 3, 4, max_head_dim=64, dropout_max_head_dim=0),
    _Tile(32, 128, 3, 8, dropout_max_head_dim=64), _Tile(32, 64, 3, 4, max_head_dim=64),
    _Tile(16, 64, 3, 8))
# float32 (IEEE dots on CUDA cores, no wgmma) reaches the TMA kernels on a GPU
# only by tma=True: the pointer kernels' tiles, which spill there (compiled for
# sm_90 on Triton 3.6 and 3.9: up to 2.4 KB per thread inside the forward's
# loop at D=64, up to 6 KB inside the atomic backward's at D=64 and 33 KB at
# D=128), hence the pointer kernels as float32's default on a GPU.
_FWD_TMA_TILES_FP32 = _FWD_TILES_FP32
_BWD_ATOMIC_TILES_FP32 = _DKDV_TILES_FP32
_TILES = {  # kernel -> (16-bit tiles, float32 tiles)
    "fwd": (_FWD_TILES, _FWD_TILES_FP32),
    "dkdv": (_DKDV_TILES, _DKDV_TILES_FP32),
    "dq": (_DQ_TILES, _DQ_TILES_FP32),
    "fwd_tma": (_FWD_TMA_TILES, _FWD_TMA_TILES_FP32),
    "bwd_atomic": (_BWD_ATOMIC_TILES, _BWD_ATOMIC_TILES_FP32),
}

# Shared-memory tiles per kernel, in rows of HEAD_DIM elements: (held for the
# whole program, held once per pipeline stage), as functions of (BLOCK_M, BLOCK_N).
_SMEM_ROWS = {
    "fwd": (lambda bm, bn: bm, lambda bm, bn: 2 * bn),           # Q; K and V
    "dkdv": (lambda bm, bn: 2 * bn, lambda bm, bn: 2 * bm),      # K, V; Q and dO
    "dq": (lambda bm, bn: 2 * bm, lambda bm, bn: 2 * bn),        # Q, dO; K and V
    "fwd_tma": (lambda bm, bn: 2 * bm, lambda bm, bn: 2 * bn),   # Q, O's store; K and V
    "bwd_atomic": (lambda bm, bn: 2 * bn, lambda bm, bn: 2 * bm),  # K, V; Q and dO
}

# The preprocessing kernel's query rows per program. O and dO tiles of 64 rows
# x D=128 in fp32 over 4 warps: 128 values per thread in registers; 128 rows
# would double that and spill. The interpreter runs it with the small tile.
_PREPROCESS_BLOCK_M = 64
_PREPROCESS_BLOCK_M_INTERPRETER = 32
_PREPROCESS_WARPS = 4


def _smem_bytes(kind, block_m, block_n, num_stages, head_dim, element_size):
    """Estimated shared memory of one program of kernel `kind` (a lower bound)."""
    resident, streamed = _SMEM_ROWS[kind]
    rows = resident(block_m, block_n) + max(num_stages, 1) * streamed(block_m, block_n)
    return rows * head_dim * element_size


def _launch_shape(config):
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages,
            config.num_warps)


def _configs(kind):
    # One autotuner serves every dtype and head dim; the pruner below picks
    # the tiles meant for each.
    tiles16, tiles32 = _TILES[kind]
    shapes = dict.fromkeys(t.launch_shape() for t in tiles16 + tiles32)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
            for bm, bn, s, w in shapes]


def _smem_pruner(kind):
    """Keeps the tiles meant for the operands' dtype, head dim and dropout,
    minus those whose pipelined tiles cannot fit in shared memory (they would
    only fail to launch, after costing the compile time)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        head_dim, elsize = args["HEAD_DIM"], args["Q"].element_size()
        wanted = {t.launch_shape() for t in _TILES[kind][1 if elsize == 4 else 0]
                  if t.offered(head_dim, args["DROPOUT"])}
        configs = [c for c in configs if _launch_shape(c) in wanted] or configs

        def need(c):
            bm, bn, stages, _ = _launch_shape(c)
            return _smem_bytes(kind, bm, bn, stages, head_dim, elsize)
        fits = [c for c in configs if need(c) <= SMEM_BUDGET_BYTES]
        return fits or [min(configs, key=need)]
    return prune


_AUTOTUNE_KEY = ["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL", "DROPOUT"]
_attn_fwd_tuned = triton.autotune(
    _configs("fwd"), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _smem_pruner("fwd")})(_attn_fwd)
# The deterministic backward's kernels only store (never accumulate into)
# their outputs, so the autotuner's repeated runs cannot corrupt them.
_attn_bwd_dkdv_tuned = triton.autotune(
    _configs("dkdv"), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _smem_pruner("dkdv")})(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(
    _configs("dq"), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _smem_pruner("dq")})(_attn_bwd_dq)
_attn_fwd_tma_tuned = triton.autotune(
    _configs("fwd_tma"), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _smem_pruner("fwd_tma")})(_attn_fwd_tma)
# The atomic backward adds into DQ_ACC: each of the autotuner's trial runs
# starts from zeros, and so does the run that counts.
_attn_bwd_atomic_tuned = triton.autotune(
    _configs("bwd_atomic"), key=_AUTOTUNE_KEY, reset_to_zero=["DQ_ACC"],
    prune_configs_by={"early_config_prune": _smem_pruner("bwd_atomic")})(_attn_bwd_atomic)


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Call:
    """What one attention call computes, beyond its tensors."""
    causal: bool
    sm_scale: float
    dropout_p: float = 0.0
    # The backward: the two-kernel path without atomics (True) or the atomic
    # 5-matmul kernel where the TMA kernels run (False).
    deterministic: bool = False
    # The TMA kernels: None where they apply, True always, False never.
    tma: bool | None = None
    # Tests only: these tiles instead of the autotuner (or the interpreter's tiles).
    tiles: _Tiles | None = None


def _precision(dtype):
    # fp32 stays exact fp32 (IEEE dots, also on the GPU) so it can serve as a
    # reference; fp16/bf16 run on tensor cores at full speed either way. The
    # interpreter's bf16 arithmetic is wrong (its dots multiply the raw 16-bit
    # patterns): there bf16 tiles are converted to fp32 as they are loaded
    # (`_operand`) and every dot is IEEE fp32.
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting()):
        return "ieee"
    return "tf32"


def _bucket(n):
    # Autotune once per power-of-two length, not per length: decoding changes
    # Tk every step and must not re-benchmark every step.
    return triton.next_power_of_2(max(int(n), 1))


def _config(tile):
    return triton.Config({"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n},
                         num_stages=tile.num_stages, num_warps=tile.num_warps)


def _launch(tuned, grid_fn, args, meta, kind, call):
    """Runs kernel `kind` through its autotuner (the interpreter's tile under
    the interpreter), or with the call's fixed tile when it has one."""
    tile = getattr(call.tiles, kind) if call.tiles is not None else None
    if tile is None:
        interpreter_config = _config(getattr(_INTERPRETER_TILES, kind))
        launch_autotuned(tuned, grid_fn, args, meta, interpreter_config=interpreter_config)
        return
    meta = dict(meta, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n)
    tuned.fn[grid_fn(meta)](*args, **meta, num_stages=tile.num_stages, num_warps=tile.num_warps)


def _start_address(t):
    """t's first element's address; for tensors that hold no memory (meta, or
    the fake tensors that shape-only recorders use) its offset into a storage
    the allocator would align, as it aligns every real one."""
    if t.device.type == "meta" or isinstance(t, FakeTensor):
        return t.storage_offset() * t.element_size()
    return t.data_ptr()


def _tma_unready_reason(t):
    """Why TMA descriptors cannot read t's (rows, D) matrices, or None: they
    need a 16-byte aligned start and, for every dimension but the last (stride
    1) that has more than one index, a positive stride of a multiple of 16 bytes."""
    if _start_address(t) % 16:
        return "its data does not start on a 16-byte boundary"
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size > 1 and (stride <= 0 or stride * t.element_size() % 16):
            return f"stride {stride} is not a positive multiple of 16 bytes"
    return None


def _use_tma(call, q, k, v):
    """Whether this call runs the TMA kernels: as asked, or by default where
    TMA serves the inputs and they gain from it: 16-bit inputs on a GPU with
    TMA (Hopper and newer), and every dtype under the interpreter, which runs
    descriptors as masked loads (it is where their numerics are tested)."""
    if call.tma is not None:
        return call.tma
    if any(_tma_unready_reason(t) for t in (q, k, v)):
        return False
    if q.device.type == "cpu":
        return True
    # A GPU (or the compile check's stand-in for one, meta tensors).
    return q.dtype != torch.float32 and torch.cuda.get_device_properties(q.device).major >= 9


def _head_strides(t):
    """(batch, head, row) strides of a (B, H, T, D) tensor for the TMA kernels.
    A length-1 row dimension's stride is any number; the descriptor gets D,
    a valid one."""
    return t.stride(0), t.stride(1), t.stride(2) if t.shape[2] > 1 else t.shape[3]


def _row_stats(B, H, T, device):
    """A (B, H, T) fp32 tensor of per-row statistics (LSE, delta) whose rows
    start 16 bytes apart, as TMA reads them: a view of a wider buffer."""
    return torch.empty((B, H, -(-T // 4) * 4), device=device, dtype=torch.float32)[..., :T]


def _forward(q, k, v, seed, call):
    """(o, lse): o (B, H, Tq, D) laid out (B, Tq, H, D); lse (B, H, Tq) fp32, base 2."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    # (B, Tq, H, D) in memory: the model's `o.transpose(1, 2).reshape(B, Tq, H*D)`
    # is then free.
    o = torch.empty((B, Tq, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = _row_stats(B, H, Tq, q.device)
    if o.numel() == 0:
        return o, lse

    def grid(meta):
        return (triton.cdiv(Tq, meta["BLOCK_M"]) * B * H,)

    common = (H, Tq, Tk, _bucket(Tq), _bucket(Tk), lse.stride(1), call.sm_scale * _LOG2E, seed,
              call.dropout_p)
    meta = {"HEAD_DIM": D, "CAUSAL": call.causal, "DROPOUT": call.dropout_p > 0,
            "PRECISION": _precision(q.dtype)}
    if _use_tma(call, q, k, v):
        args = (q, k, v, o, lse, *_head_strides(q), *_head_strides(k), *_head_strides(v),
                *_head_strides(o), *common)
        with_descriptor_scratch(q.device, _launch, _attn_fwd_tma_tuned, grid, args, meta,
                                "fwd_tma", call)
    else:
        args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *common)
        _launch(_attn_fwd_tuned, grid, args, meta, "fwd", call)
    return o, lse


def _backward(do, q, k, v, o, lse, seed, call, dq, dk, dv):
    """Writes the gradients into dq (or skips it when None) and into dk and dv
    (both, or neither when both are None); any strides with the last one 1."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if q.numel() == 0 or k.numel() == 0:
        # No query (or no head): keys received no gradient at all.
        for grad in (dk, dv):
            if grad is not None:
                grad.zero_()
        return
    # The atomic kernel computes dQ, dK and dV together: it serves calls that
    # want all three.
    atomic = (not call.deterministic and dq is not None and dk is not None
              and _use_tma(call, q, k, v))
    if do.stride(-1) != 1 or (atomic and _tma_unready_reason(do)):
        # e.g. the stride-0 gradient of `out.sum()`; keep the loads vectorised.
        do = do.contiguous()
    delta = _row_stats(B, H, Tq, q.device)
    dq_acc = torch.empty((B * H, Tq, D), device=q.device, dtype=torch.float32) if atomic else delta
    block = pick(gpu=_PREPROCESS_BLOCK_M, interpreter=_PREPROCESS_BLOCK_M_INTERPRETER)
    rows_grid = (triton.cdiv(Tq, block) * B * H,)
    _attn_bwd_preprocess[rows_grid](
        o, do, delta, dq_acc, *o.stride(), *do.stride(), H, Tq, delta.stride(1),
        HEAD_DIM=D, BLOCK_M=block, ZERO_DQ=atomic, num_warps=_PREPROCESS_WARPS)

    common = (H, Tq, Tk, _bucket(Tq), _bucket(Tk), lse.stride(1), call.sm_scale * _LOG2E,
              call.sm_scale, seed, call.dropout_p)
    meta = {"HEAD_DIM": D, "CAUSAL": call.causal, "DROPOUT": call.dropout_p > 0,
            "PRECISION": _precision(q.dtype)}
    if atomic:
        args = (q, k, v, do, lse, delta, dk, dv, dq_acc, *_head_strides(q), *_head_strides(k),
                *_head_strides(v), *_head_strides(do), *_head_strides(dk), *_head_strides(dv),
                *common)
        with_descriptor_scratch(q.device, _launch, _attn_bwd_atomic_tuned,
                                lambda m: (triton.cdiv(Tk, m["BLOCK_N"]) * B * H,), args, meta,
                                "bwd_atomic", call)
        _attn_bwd_dq_store[rows_grid](dq_acc, dq, *dq.stride(), H, Tq, call.sm_scale,
                                      HEAD_DIM=D, BLOCK_M=block, num_warps=_PREPROCESS_WARPS)
        return
    if dk is not None:
        args = (q, k, v, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(),
                *do.stride(), *dk.stride(), *dv.stride(), *common)
        _launch(_attn_bwd_dkdv_tuned, lambda m: (triton.cdiv(Tk, m["BLOCK_N"]) * B * H,),
                args, meta, "dkdv", call)
    if dq is not None:
        args = (q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(),
                *do.stride(), *dq.stride(), *common)
        _launch(_attn_bwd_dq_tuned, lambda m: (triton.cdiv(Tq, m["BLOCK_M"]) * B * H,),
                args, meta, "dq", call)


# ----------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------
class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seed, call):
        with on_device(q):
            o, lse = _forward(q, k, v, seed, call)
        ctx.save_for_backward(q, k, v, o, lse, seed)
        ctx.call = call
        return o

    @staticmethod
    @once_differentiable("flash_attention")
    def backward(ctx, do):
        q, k, v, o, lse, seed = ctx.saved_tensors
        need_dq = ctx.needs_input_grad[0]
        need_dkv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq = torch.empty_like(q) if need_dq else None
        dk = torch.empty_like(k) if need_dkv else None
        dv = torch.empty_like(v) if need_dkv else None
        if need_dq or need_dkv:
            with on_device(q):
                _backward(do, q, k, v, o, lse, seed, ctx.call, dq, dk, dv)
        if not ctx.needs_input_grad[1]:
            dk = None
        if not ctx.needs_input_grad[2]:
            dv = None
        return dq, dk, dv, None, None


def _unpack_qkv(qkv):
    """(B, T, 3, H, D) -> q, k, v as (B, H, T, D) views."""
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


class _FlashAttentionQKVPacked(torch.autograd.Function):
    """Attention over the q, k, v slices of one packed tensor. The backward
    allocates one gradient of the packed shape and the kernels write dq, dk and
    dv straight into its slices, so autograd never gathers three separate
    gradients into the packed layout (a stack and a copy per call)."""

    @staticmethod
    def forward(ctx, qkv, seed, call):
        with on_device(qkv):
            o, lse = _forward(*_unpack_qkv(qkv), seed, call)
        ctx.save_for_backward(qkv, o, lse, seed)
        ctx.call = call
        return o

    @staticmethod
    @once_differentiable("flash_attention_qkvpacked")
    def backward(ctx, do):
        qkv, o, lse, seed = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
        with on_device(qkv):
            _backward(do, *_unpack_qkv(qkv), o, lse, seed, ctx.call, *_unpack_qkv(dqkv))
        return dqkv, None, None


def _attention(q, k, v, call, seed=None):
    """The autograd entry without input checks (tests reach fixed tiles here)."""
    return _FlashAttention.apply(q, k, v, seed, call)


def _attention_qkvpacked(qkv, call, seed=None):
    """The packed autograd entry without input checks."""
    return _FlashAttentionQKVPacked.apply(qkv, seed, call)


# ----------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------
def _check_inputs(name, q, k, v, causal, sm_scale, dropout_p):
    check_tensor(name, "q", q, dtypes=FLOAT_DTYPES, dim=4, layout="(B, H, Tq, D)",
                 last_stride_one=True)
    B, H, _, D = q.shape
    check_tensor(name, "k", k, dim=4, shape=(B, H, None, D), layout="(B, H, Tk, D)",
                 last_stride_one=True)
    check_tensor(name, "v", v, shape=k.shape, layout="(B, H, Tk, D)", last_stride_one=True)
    check_same_device(name, q=q, k=k, v=v)
    check_same_dtype(name, q=q, k=k, v=v)
    _check_options(name, "q", q.shape, k.shape[2], causal, sm_scale, dropout_p)


def _check_kernel_choice(name, deterministic, tma, **inputs):
    """deterministic and tma, against the inputs they are for."""
    if not isinstance(deterministic, bool):
        raise TypeError(f"{name}: deterministic must be a bool, got {type(deterministic).__name__}")
    if tma is not None and not isinstance(tma, bool):
        raise TypeError(f"{name}: tma must be None or a bool, got {type(tma).__name__}")
    if tma:
        for arg, t in inputs.items():
            reason = _tma_unready_reason(t)
            if reason:
                raise ValueError(f"{name}: tma=True, but TMA cannot read {arg}: {reason}")


def _check_options(name, arg, q_shape, Tk, causal, sm_scale, dropout_p):
    """The checks shared by both entries; `arg` names the tensor that holds q."""
    B, H, Tq, D = q_shape
    if D not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name}: {arg} has head dim {D}; supported: "
                         + ", ".join(map(str, _SUPPORTED_HEAD_DIMS)))
    if not isinstance(causal, bool):
        raise TypeError(f"{name}: causal must be a bool, got {type(causal).__name__}")
    if sm_scale is not None:
        check_real(name, "sm_scale", sm_scale)
    check_dropout_p(name, dropout_p)
    if Tk == 0 and Tq > 0 and B * H > 0:
        raise ValueError(f"{name}: k has no keys (Tk=0) for Tq={Tq} queries")
    if causal and Tq > Tk:
        raise ValueError(f"{name}: causal attention needs Tq <= Tk (queries are aligned to the "
                         f"end of the keys); got q with Tq={Tq} and k with Tk={Tk}")


def flash_attention(q, k, v, causal=True, sm_scale=None, dropout_p=0.0, seed=None,
                    deterministic=False, tma=None):
    """Fused attention: softmax(q @ k^T * sm_scale + mask) @ v, never forming T x T.

    Args:
        q: (B, H, Tq, D); k, v: (B, H, Tk, D). Same device (CUDA, or CPU under
            TRITON_INTERPRET=1) and same dtype: float16, bfloat16 or float32.
            D in {16, 32, 64, 128}. Any strides with the last one 1, so a
            (B, T, H, D) tensor's `.transpose(1, 2)` is used without a copy.
        causal: mask so that query i (at absolute position Tk - Tq + i, i.e.
            aligned to the END of the keys) sees keys 0 .. Tk - Tq + i. Needs
            Tq <= Tk. For Tq == Tk this is the usual lower-triangular mask.
        sm_scale: score scale; default D ** -0.5.
        dropout_p: probability in [0, 1) of zeroing each attention probability
            after the softmax; the kept ones are scaled by 1 / (1 - dropout_p).
            The kernels use p in float32, so p must stay below 1 there too
            (p <= 1 - 2**-24).
        seed: with dropout, the mask's key: an int64 tensor of shape (1,) on
            q's device, read by the kernels on the device (never copied to the
            host). The same seed and inputs give the same mask, forward and
            backward. None (default) draws one per call with
            `torch.randint(..., device=q.device)` from that device's default
            generator, so `torch.manual_seed` makes runs reproducible and a
            captured CUDA graph draws a new mask on every replay. Checked
            whatever dropout_p is, and not used when it is 0.
        deterministic: False (default): where the TMA kernels run, the
            backward is one kernel of 5 matmuls per block pair that adds dq up
            with fp32 atomics, whose order varies, so dq can differ from run
            to run in its last bits (dk and dv do not). True: the two-kernel
            backward without atomics (7 matmuls per block pair), the same bits
            every run.
        tma: None (default): the kernels that load through TMA descriptors
            where the device has TMA (Hopper and newer), the inputs are 16-bit
            and q, k, v allow it (data and every stride but the last 16-byte
            aligned, as contiguous, transposed and packed layouts of these
            head dims are); else the kernels of pointer loads (float32 on a
            GPU among them: its IEEE dots do not use the tensor cores the TMA
            kernels are built around). True: always the TMA kernels (a
            ValueError where q, k or v does not allow them; on a GPU without
            TMA, Triton lowers them to ordinary loads). False: always the
            pointer kernels, whose backward is the deterministic one.

    Returns:
        (B, H, Tq, D) in q's dtype, laid out (B, Tq, H, D) in memory. The
        forward and the gradients for q, k, v equal
        `F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale)`
        when Tq == Tk; for Tq < Tk with causal, SDPA with the explicit boolean
        mask `key_pos <= Tk - Tq + query_pos` (SDPA's is_causal aligns to the
        top-left instead). Softmax statistics and all accumulation are fp32.
        float32 inputs use IEEE fp32 dots (no TF32), also on the GPU: exact but
        slower; the fast path is float16/bfloat16. bfloat16 under Triton's
        CPU interpreter (whose bf16 arithmetic is wrong) is converted to fp32
        inside the kernels as it is loaded, multiplied in fp32 and stored in
        bf16. The backward is once-differentiable: a gradient
        through it taken with create_graph=True (double backward) raises, also
        when the loss is linear in the output (SDPA allows it).

        With dropout_p > 0 the forward and gradients equal SDPA's formula with
        the mask M the seed draws: `((softmax(s) * M) / (1 - dropout_p)) @ v`;
        the mask is regenerated in the backward, never stored. dropout_p = 0
        runs the plain kernels and gives the same bits as without the argument.
    """
    name = "flash_attention"
    _check_inputs(name, q, k, v, causal, sm_scale, dropout_p)
    _check_kernel_choice(name, deterministic, tma, q=q, k=k, v=v)
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    seed = dropout_seed(name, q.device, dropout_p, seed)
    return _attention(q, k, v, _Call(causal, float(sm_scale), float(dropout_p), deterministic, tma),
                      seed)


def flash_attention_qkvpacked(qkv, causal=True, sm_scale=None, dropout_p=0.0, seed=None,
                              deterministic=False, tma=None):
    """`flash_attention` on the q, k, v packed in one tensor, with one packed gradient.

    Args:
        qkv: (B, T, 3, H, D), e.g. the qkv projection's (B, T, 3*H*D) output
            viewed as (B, T, 3, H, D); q, k, v are its slices [:, :, 0], [:, :, 1],
            [:, :, 2]. Any strides with the last one 1. Device, dtype and D as
            for `flash_attention`.
        causal, sm_scale, dropout_p, seed, deterministic, tma: as for
            `flash_attention` (the same seed draws the same mask through
            either entry, whichever kernels run).

    Returns:
        (B, H, T, D) in qkv's dtype, laid out (B, T, H, D) in memory, equal to
        `flash_attention(q, k, v, ...)` with q, k, v = (t.transpose(1, 2) for t
        in qkv.unbind(2)), and so to `F.scaled_dot_product_attention` on them.
        The gradient for qkv is one contiguous (B, T, 3, H, D) tensor that the
        kernels fill slice by slice: no stack or copy gathers dq, dk and dv.
    """
    name = "flash_attention_qkvpacked"
    check_tensor(name, "qkv", qkv, dtypes=FLOAT_DTYPES, dim=5, shape=(None, None, 3, None, None),
                 layout="(B, T, 3, H, D)", last_stride_one=True)
    check_same_device(name, qkv=qkv)
    B, T, _, H, D = qkv.shape
    _check_options(name, "qkv", (B, H, T, D), T, causal, sm_scale, dropout_p)
    _check_kernel_choice(name, deterministic, tma, qkv=qkv)
    if sm_scale is None:
        sm_scale = D ** -0.5
    seed = dropout_seed(name, qkv.device, dropout_p, seed)
    call = _Call(causal, float(sm_scale), float(dropout_p), deterministic, tma)
    return _attention_qkvpacked(qkv, call, seed)
