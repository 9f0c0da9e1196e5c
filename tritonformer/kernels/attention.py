"""Flash attention (FlashAttention-2 structure): forward, backward, ALiBi, causal bottom-right.

Shapes: q (B, H, Sq, D), k and v (B, H, Skv, D), any strides whose last is 1 and whose others
are multiples of 16 bytes (``ops.attention`` copies anything else). Each program works on one
(batch, head) and reads its tiles through tensor descriptors (TMA on Hopper) made in the kernel
from that head's base pointer (offsets of batch and head in int64) and sequence stride; the
descriptors zero-fill rows past Sq/Skv and columns past D, so D is padded to the power of two
BLOCK_D without any masked load.

Conventions shared by every kernel here (log2 domain: exp2 with log2(e) folded into scales):
- diag = Skv - Sq: query i sees keys j <= i + diag when causal (the mask aligned bottom-right).
- x_ij = log2(e) * (scale * q_i.k_j - slope_h * |i + diag - j|) are the scores; the stored LSE
  is their base-2 logsumexp log2(sum_j 2^x_ij) per query row (the natural-log one times
  log2(e), kept in base 2 to save two roundings), +inf for a row that sees no key (so every
  recomputed probability of that row is exp2(x - inf) = 0 and its output is 0).
- Causal blocks are split by loop bounds: key blocks entirely above the diagonal are never
  visited, blocks entirely below it run an unmasked loop, and only the diagonal (and tail)
  blocks run the masked loop.
- ALIBI (constexpr): 0 none; 1 exact, the bias -slope * |j - i - diag| computed per score;
  2 folded (causal, 16-bit inputs): on visible keys the bias is slope * (j - i - diag), a
  per-column term minus a per-row term. The forward keeps its running max over
  x + slope2 * (i - m0) (its block's per-row term dropped, which softmax ignores) and removes
  it from the LSE at the end; the backward folds the per-row term into the LSE vector. The
  forward pays one FADD per score over plain causal (the backward nothing) where the exact
  form pays four ops, but the exponent's terms grow to about slope * BLOCK, so fp32 inputs,
  whose rounding would show it, take the exact form.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..runtime import INTERPRET, empty

LOG2E = 1.4426950408889634


class FwdConfig(NamedTuple):
    block_m: int  # query rows per program
    block_n: int  # keys per loop iteration
    num_warps: int
    num_stages: int


class BwdConfig(NamedTuple):
    block_m: int  # dK/dV kernel: query rows per loop iteration
    block_n: int  # dK/dV kernel: keys per program
    num_warps: int
    num_stages: int
    dq_atomic: bool  # dQ summed by the dK/dV kernel (fp32 reduce-adds), not by its own kernel
    dq_block_m: int  # dQ kernel (when not dq_atomic): query rows per program
    dq_block_n: int  # dQ kernel: keys per loop iteration
    dq_num_warps: int
    dq_num_stages: int


# ---------------------------------------------------------------------------------------------
# Tuning table, keyed by (BLOCK_D = D padded to a power of two, dtype, causal). fp16 and bf16
# share entries (same element size, same tensor-core rate). BLOCK_D 64 and 128, causal: swept
# on the lent GPU (an H200 both times; docs/perf/attention.md, scripts/tune_attention.py);
# 16 and 32 take the 64 entry, the full-mask entries the causal ones; 256 and fp32 were sized
# offline (sm_90 compiles: shared memory, registers, spills), not timed. One warpgroup per
# program with 64-row tiles won: two programs share an SM and hide each other's softmax.
# Under the interpreter one entry serves all: few, large blocks.
# ---------------------------------------------------------------------------------------------
_16 = "16-bit"
_32 = "fp32"
CONFIGS: dict[tuple[int, str, bool], tuple[FwdConfig, BwdConfig]] = {
    (16, _16, True): (FwdConfig(64, 64, 4, 2), BwdConfig(64, 64, 4, 3, True, 64, 64, 4, 2)),
    (16, _16, False): (FwdConfig(64, 64, 4, 2), BwdConfig(64, 64, 4, 3, True, 64, 64, 4, 2)),
    (32, _16, True): (FwdConfig(64, 64, 4, 2), BwdConfig(64, 64, 4, 3, True, 64, 64, 4, 2)),
    (32, _16, False): (FwdConfig(64, 64, 4, 2), BwdConfig(64, 64, 4, 3, True, 64, 64, 4, 2)),
    (64, _16, True): (FwdConfig(64, 64, 4, 2), BwdConfig(64, 64, 4, 3, True, 64, 64, 4, 2)),
    (64, _16, False): (FwdConfig(64, 64, 4, 2), BwdConfig(64, 64, 4, 3, True, 64, 64, 4, 2)),
    (128, _16, True): (FwdConfig(64, 64, 4, 3), BwdConfig(64, 64, 4, 2, False, 128, 64, 8, 3)),
    (128, _16, False): (FwdConfig(64, 64, 4, 3), BwdConfig(64, 64, 4, 2, False, 128, 64, 8, 3)),
    (256, _16, True): (FwdConfig(128, 64, 8, 2), BwdConfig(32, 64, 8, 1, False, 64, 64, 8, 2)),
    (256, _16, False): (FwdConfig(128, 64, 8, 2), BwdConfig(32, 64, 8, 1, False, 64, 64, 8, 2)),
    # fp32: IEEE dots run on the FMA units, whose operand tiles live in registers: small tiles.
    (16, _32, True): (FwdConfig(32, 16, 4, 1), BwdConfig(16, 32, 4, 1, False, 16, 32, 4, 1)),
    (16, _32, False): (FwdConfig(32, 16, 4, 1), BwdConfig(16, 32, 4, 1, False, 16, 32, 4, 1)),
    (32, _32, True): (FwdConfig(32, 16, 4, 1), BwdConfig(16, 32, 4, 1, False, 32, 16, 4, 1)),
    (32, _32, False): (FwdConfig(32, 16, 4, 1), BwdConfig(16, 32, 4, 1, False, 32, 16, 4, 1)),
    (64, _32, True): (FwdConfig(16, 32, 4, 1), BwdConfig(16, 16, 4, 1, False, 16, 16, 4, 1)),
    (64, _32, False): (FwdConfig(16, 32, 4, 1), BwdConfig(16, 16, 4, 1, False, 16, 16, 4, 1)),
    (128, _32, True): (FwdConfig(16, 16, 4, 1), BwdConfig(16, 16, 4, 1, False, 16, 16, 4, 1)),
    (128, _32, False): (FwdConfig(16, 16, 4, 1), BwdConfig(16, 16, 4, 1, False, 16, 16, 4, 1)),
    (256, _32, True): (FwdConfig(16, 16, 4, 1), BwdConfig(16, 16, 4, 1, False, 16, 16, 4, 1)),
    (256, _32, False): (FwdConfig(16, 16, 4, 1), BwdConfig(16, 16, 4, 1, False, 16, 16, 4, 1)),
}
# The forward with folded ALiBi (ALIBI == 2) at BLOCK_D 64: its extra FADD per score moves the
# balance to a deeper pipeline, and at short key lengths to narrower key blocks. Rows
# (longest Skv, config), first match wins. Swept on an H200 (docs/perf/attention.md, v3):
# ALiBi over plain causal +24/+24/+20/+15% at S = 1k/2k/4k/8k with the plain entry, +4/+10/+9/+8%
# with these.
ALIBI_FWD_CONFIGS: dict[int, tuple[tuple[int, FwdConfig], ...]] = {
    64: ((1024, FwdConfig(64, 32, 4, 3)), (2**62, FwdConfig(64, 64, 4, 3))),
}
INTERPRET_CONFIG = (FwdConfig(64, 64, 4, 1), BwdConfig(64, 64, 4, 1, False, 64, 64, 4, 1))
DELTA_BLOCK_M = 64  # rows per program of the delta = rowsum(dO * O) and dQ-conversion kernels


def block_d(head_dim: int) -> int:
    """Head dim padded to the power of two the kernels tile with (at least 16, for tl.dot)."""
    return max(16, triton.next_power_of_2(head_dim))


def config_for(head_dim: int, dtype: torch.dtype, causal: bool,
               folded_alibi_skv: int | None = None) -> tuple[FwdConfig, BwdConfig]:
    """The (forward, backward) tuning entry for this head dim, dtype and mask;
    ``folded_alibi_skv``, the key length when the forward runs folded ALiBi, selects its
    forward from ALIBI_FWD_CONFIGS where that has rows for the head dim.

    Under the interpreter: INTERPRET_CONFIG's blocks with the compiled entry's dQ strategy, so
    the CPU tests run both the dQ kernel and the dQ reduce-adds. The reduce-adds sum dQ in an
    order that varies from run to run: under ``torch.use_deterministic_algorithms(True)`` the
    dQ kernel runs instead.
    """
    bd = block_d(head_dim)
    fwd, bwd = CONFIGS[(bd, _32 if dtype == torch.float32 else _16, causal)]
    if folded_alibi_skv is not None:
        fwd = next((c for n, c in ALIBI_FWD_CONFIGS.get(bd, ()) if folded_alibi_skv <= n), fwd)
    if torch.are_deterministic_algorithms_enabled():
        bwd = bwd._replace(dq_atomic=False)
    if INTERPRET:
        return INTERPRET_CONFIG[0], INTERPRET_CONFIG[1]._replace(dq_atomic=bwd.dq_atomic)
    return fwd, bwd


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _head_desc(ptr, off_b, off_h, stride_b, stride_h, stride_s, stride_d, seq_len,
               HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tensor descriptor of one (batch, head) slice [seq_len, HEAD_DIM] of a 4-D tensor.

    The batch/head offset is computed in int64; blocks are [BLOCK_S, BLOCK_D], zero-filled
    (loads) or clipped (stores) outside [seq_len, HEAD_DIM].
    """
    base = ptr + off_b.to(tl.int64) * stride_b + off_h.to(tl.int64) * stride_h
    return tl.make_tensor_descriptor(base, shape=[seq_len, HEAD_DIM], strides=[stride_s, stride_d],
                                     block_shape=[BLOCK_S, BLOCK_D])


@triton.jit
def _causal_key_bounds(m0, diag, SKV, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr):
    """Key ranges of the query block [m0, m0 + BLOCK_M): [0, full) unmasked, [full, hi) masked.

    Causal: a key block is unmasked when every row of the block sees all of it (its last key
    <= m0 + diag) and it has no tail; keys past m0 + BLOCK_M - 1 + diag are never visited.
    """
    if CAUSAL:
        full = tl.maximum(tl.minimum(m0 + diag + 1, SKV), 0) // BLOCK_N * BLOCK_N
        hi = tl.maximum(tl.minimum(m0 + BLOCK_M + diag, SKV), full)
    else:
        full = SKV // BLOCK_N * BLOCK_N
        hi = SKV
    return full, hi


@triton.jit
def _attn_fwd_step(acc, l_i, m_i, qk, desc_v, start_n, rel0, qk_scale, slope2, col,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIBI: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a key block that every row of the query block fully sees.

    qk: unscaled scores [BLOCK_M, BLOCK_N] of the keys from start_n; rel0 = start_n - m0 - diag
    (rel = j - i - diag = rel0 + jj - ii); col = slope2 * jj, hoisted by the caller. V is
    loaded last: the wait on its copy is a scheduling barrier the exponentials should not
    sit behind.
    """
    if ALIBI == 2:  # x = qk * qk_scale + slope2 * (rel0 + jj): the row part slope2 * ii dropped
        y = qk * qk_scale + col[None, :]
        shift = slope2 * rel0.to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(y, 1) + shift)
        p = tl.math.exp2(y - (m_new - shift)[:, None])
    elif ALIBI == 1:
        rel = rel0 + tl.arange(0, BLOCK_N)[None, :] - tl.arange(0, BLOCK_M)[:, None]
        x = qk * qk_scale - slope2 * tl.abs(rel).to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(x, 1))
        p = tl.math.exp2(x - m_new[:, None])
    else:  # qk_scale > 0: scale the row max, then one FMA per score
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = desc_v.load([start_n, 0])
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_unmasked(acc, l_i, m_i, q, desc_k, desc_v, hi, m0, diag, qk_scale, slope2,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIBI: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Online softmax over the fully visible key blocks [0, hi), hi a multiple of BLOCK_N."""
    col = slope2 * tl.arange(0, BLOCK_N).to(tl.float32)
    for start_n in tl.range(0, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        qk = tl.dot(q, desc_k.load([start_n, 0]).T, input_precision=DOT_PRECISION)
        acc, l_i, m_i = _attn_fwd_step(acc, l_i, m_i, qk, desc_v, start_n, start_n - m0 - diag,
                                       qk_scale, slope2, col, BLOCK_M, BLOCK_N, ALIBI,
                                       DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_masked(acc, l_i, m_i, q, desc_k, desc_v, lo, hi, m0, diag, SKV, qk_scale, slope2,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks [lo, hi) that need the causal or the tail mask."""
    offs_i = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        qk = tl.dot(q, desc_k.load([start_n, 0]).T, input_precision=DOT_PRECISION)
        rel0 = start_n - m0 - diag  # rel = j - i - diag = rel0 + jj - ii
        if ALIBI == 2:  # visible keys have rel <= 0: bias = slope * rel (row part dropped)
            x = qk * qk_scale + (slope2 * (rel0 + offs_j).to(tl.float32))[None, :]
        elif ALIBI == 1:
            rel = rel0 + offs_j[None, :] - offs_i[:, None]
            x = qk * qk_scale - slope2 * tl.abs(rel).to(tl.float32)
        else:
            x = qk * qk_scale
        keep = (start_n + offs_j)[None, :] < SKV
        if CAUSAL:
            keep = keep & ((offs_j[None, :] - offs_i[:, None]) <= -rel0)
        x = tl.where(keep, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        p = tl.math.exp2(x - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def attn_fwd_kernel(
    Q,  # queries, (B, H, SQ, HEAD_DIM), strides stride_q*
    K,  # keys, (B, H, SKV, HEAD_DIM), strides stride_k*
    V,  # values, (B, H, SKV, HEAD_DIM), strides stride_v*
    O,  # output (written), (B, H, SQ, HEAD_DIM), strides stride_o*, Q's dtype
    LSE,  # logsumexp (written), fp32, contiguous (B, H, SQ), base 2, +inf for empty rows
    SLOPES,  # ALiBi slopes, fp32, (H,) (unused if ALIBI == 0)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H,  # number of heads
    SQ,  # query length
    SKV,  # key/value length
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per iteration
    CAUSAL: tl.constexpr,
    ALIBI: tl.constexpr,  # 0 none, 1 exact, 2 folded (see the module doc)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" for fp32 inputs
):
    """O = softmax(x) V and the LSE for one query block of one (batch, head).

    Grid (cdiv(SQ, BLOCK_M), B * H); causal programs take query blocks last to first so the
    heaviest start first and the grid ends on light ones.
    """
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    desc_q = _head_desc(Q, off_b, off_h, stride_qb, stride_qh, stride_qm, stride_qd, SQ,
                        HEAD_DIM, BLOCK_M, BLOCK_D)
    desc_k = _head_desc(K, off_b, off_h, stride_kb, stride_kh, stride_kn, stride_kd, SKV,
                        HEAD_DIM, BLOCK_N, BLOCK_D)
    desc_v = _head_desc(V, off_b, off_h, stride_vb, stride_vh, stride_vn, stride_vd, SKV,
                        HEAD_DIM, BLOCK_N, BLOCK_D)
    desc_o = _head_desc(O, off_b, off_h, stride_ob, stride_oh, stride_om, stride_od, SQ,
                        HEAD_DIM, BLOCK_M, BLOCK_D)
    m0 = pid_m * BLOCK_M
    diag = SKV - SQ
    slope2 = 0.0
    if ALIBI != 0:
        slope2 = tl.load(SLOPES + off_h) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q = desc_q.load([m0, 0])
    full, hi = _causal_key_bounds(m0, diag, SKV, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_unmasked(acc, l_i, m_i, q, desc_k, desc_v, full, m0, diag,
                                       qk_scale, slope2, BLOCK_M, BLOCK_N, ALIBI, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_masked(acc, l_i, m_i, q, desc_k, desc_v, full, hi, m0, diag, SKV,
                                     qk_scale, slope2, BLOCK_M, BLOCK_N, CAUSAL, ALIBI,
                                     DOT_PRECISION)

    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    desc_o.store([m0, 0], (acc / l_safe[:, None]).to(O.dtype.element_ty))
    offs_i = tl.arange(0, BLOCK_M)
    lse2 = m_i + tl.math.log2(l_safe)
    if ALIBI == 2:
        lse2 -= slope2 * offs_i.to(tl.float32)  # undo the row shift of the running max
    lse = tl.where(empty_row, float("inf"), lse2)
    rows = m0 + offs_i
    tl.store(LSE + off_bh.to(tl.int64) * SQ + rows, lse, mask=rows < SQ)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def attn_bwd_delta_kernel(
    O,  # forward output, (B, H, SQ, HEAD_DIM), strides stride_o*
    DO,  # output gradient, (B, H, SQ, HEAD_DIM), strides stride_do*
    DELTA,  # rowsum(dO * O) (written), fp32, contiguous (B, H, SQ)
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, SQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id O_id in fp32. Grid (cdiv(SQ, BLOCK_M), B * H)."""
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < SQ) & (cols[None, :] < HEAD_DIM)
    r64 = rows.to(tl.int64)[:, None]
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + r64 * stride_om
                + cols[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + r64 * stride_dom
                 + cols[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * SQ + rows, delta, mask=rows < SQ)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, desc_q, desc_do, desc_dq, lse_ptr, delta_ptr, dq_ptr,
                         lo, hi, n0, diag, SQ, SKV, qk_scale, slope2,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, ALIBI: tl.constexpr, MASKED: tl.constexpr,
                         DQ_ATOMIC: tl.constexpr,
                         TMA_REDUCE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of the key block [n0, n0 + BLOCK_N) over query blocks [lo, hi).

    Works on transposed tiles (keys x queries) so P^T and dS^T feed dV += P^T dO and
    dK += dS^T Q directly. With DQ_ATOMIC it also adds dS K (unscaled) into the fp32 dQ
    accumulator (a TMA reduce on the GPU, atomics under the interpreter).
    """
    offs_i = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    if ALIBI == 2:
        col = slope2 * offs_j.to(tl.float32)  # column part of slope * rel, rel = j - i - diag
    for start_m in tl.range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        q = desc_q.load([start_m, 0])
        do = desc_do.load([start_m, 0])
        rows = start_m + offs_i
        lse2 = tl.load(lse_ptr + rows, mask=rows < SQ, other=float("inf"))
        delta = tl.load(delta_ptr + rows, mask=rows < SQ, other=0.0)
        # both GEMMs on the scores first: the tensor cores run while exp2 does
        qkT = tl.dot(k, q.T, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, do.T, input_precision=DOT_PRECISION)
        rel0 = n0 - start_m - diag
        if ALIBI == 2:
            row = lse2 - slope2 * (rel0 - offs_i).to(tl.float32)
            pT = tl.math.exp2(qkT * qk_scale + col[:, None] - row[None, :])
        elif ALIBI == 1:
            rel = rel0 + offs_j[:, None] - offs_i[None, :]
            pT = tl.math.exp2(qkT * qk_scale - slope2 * tl.abs(rel).to(tl.float32)
                              - lse2[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            keep = (n0 + offs_j)[:, None] < SKV
            if CAUSAL:
                keep = keep & ((offs_j[:, None] - offs_i[None, :]) <= -rel0)
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = tl.dot(dsT, q, dk, input_precision=DOT_PRECISION)
        if DQ_ATOMIC:
            dq = tl.dot(dsT.T, k, input_precision=DOT_PRECISION)  # scaled when converted
            if TMA_REDUCE:
                desc_dq.atomic_add([start_m, 0], dq)
            else:
                cols = tl.arange(0, dq.shape[1])
                tl.atomic_add(dq_ptr + rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :], dq,
                              mask=(rows < SQ)[:, None] & (cols < HEAD_DIM)[None, :],
                              sem="relaxed")
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V,  # forward inputs, (B, H, SQ or SKV, HEAD_DIM), strides stride_q*/k*/v*
    DO,  # output gradient, (B, H, SQ, HEAD_DIM), strides stride_do*
    DK, DV,  # key/value gradients (written), (B, H, SKV, HEAD_DIM), strides stride_dk*/dv*
    DQ_ACC,  # fp32 dS K accumulator, zero-filled, contiguous (B, H, SQ, HEAD_DIM) (if DQ_ATOMIC)
    LSE,  # forward logsumexp (base 2), fp32, contiguous (B, H, SQ)
    DELTA,  # rowsum(dO * O), fp32, contiguous (B, H, SQ)
    SLOPES,  # ALiBi slopes, fp32, (H,) (unused if ALIBI == 0)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, SQ, SKV,
    qk_scale,  # softmax scale * log2(e)
    scale,  # softmax scale
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per iteration
    BLOCK_N: tl.constexpr,  # keys per program
    CAUSAL: tl.constexpr,
    ALIBI: tl.constexpr,  # 0 none, 1 exact, 2 folded
    DQ_ATOMIC: tl.constexpr,  # also accumulate dQ into DQ_ACC
    TMA_REDUCE: tl.constexpr,  # do that with TMA reduce-add (compiled) instead of atomics
    DOT_PRECISION: tl.constexpr,
):
    """dK and dV of one key block of one (batch, head). Grid (cdiv(SKV, BLOCK_N), B * H).

    Causal: the query blocks that see no key of the block are skipped (loop bounds), those
    that see all of it run unmasked, only the diagonal ones are masked. A key block with a
    tail (past SKV) runs masked throughout.
    """
    pid_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    desc_q = _head_desc(Q, off_b, off_h, stride_qb, stride_qh, stride_qm, stride_qd, SQ,
                        HEAD_DIM, BLOCK_M, BLOCK_D)
    desc_do = _head_desc(DO, off_b, off_h, stride_dob, stride_doh, stride_dom, stride_dod, SQ,
                         HEAD_DIM, BLOCK_M, BLOCK_D)
    desc_k = _head_desc(K, off_b, off_h, stride_kb, stride_kh, stride_kn, stride_kd, SKV,
                        HEAD_DIM, BLOCK_N, BLOCK_D)
    desc_v = _head_desc(V, off_b, off_h, stride_vb, stride_vh, stride_vn, stride_vd, SKV,
                        HEAD_DIM, BLOCK_N, BLOCK_D)
    desc_dk = _head_desc(DK, off_b, off_h, stride_dkb, stride_dkh, stride_dkn, stride_dkd, SKV,
                         HEAD_DIM, BLOCK_N, BLOCK_D)
    desc_dv = _head_desc(DV, off_b, off_h, stride_dvb, stride_dvh, stride_dvn, stride_dvd, SKV,
                         HEAD_DIM, BLOCK_N, BLOCK_D)
    row_off = off_bh.to(tl.int64) * SQ
    dq_ptr = DQ_ACC + row_off * HEAD_DIM
    desc_dq = desc_q  # placeholder when the accumulator is not reduced through TMA
    if DQ_ATOMIC and TMA_REDUCE:
        desc_dq = tl.make_tensor_descriptor(dq_ptr, shape=[SQ, HEAD_DIM], strides=[HEAD_DIM, 1],
                                            block_shape=[BLOCK_M, BLOCK_D])
    n0 = pid_n * BLOCK_N
    diag = SKV - SQ
    slope2 = 0.0
    if ALIBI != 0:
        slope2 = tl.load(SLOPES + off_h) * 1.4426950408889634

    k = desc_k.load([n0, 0])
    v = desc_v.load([n0, 0])
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    end = tl.cdiv(SQ, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # rows i >= n0 - diag see some key of the block; i >= n0 + BLOCK_N - 1 - diag see all
        lo = tl.minimum(tl.maximum(n0 - diag, 0), end) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M, end)
    else:
        lo = 0
        full = 0
    full = tl.where(n0 + BLOCK_N > SKV, end, full)  # a key block with a tail: all masked
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, desc_q, desc_do, desc_dq, LSE + row_off,
                                  DELTA + row_off, dq_ptr, lo, full, n0, diag, SQ, SKV, qk_scale,
                                  slope2, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, ALIBI, True,
                                  DQ_ATOMIC, TMA_REDUCE, DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, desc_q, desc_do, desc_dq, LSE + row_off,
                                  DELTA + row_off, dq_ptr, full, end, n0, diag, SQ, SKV, qk_scale,
                                  slope2, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, ALIBI, False,
                                  DQ_ATOMIC, TMA_REDUCE, DOT_PRECISION)
    desc_dk.store([n0, 0], (dk * scale).to(DK.dtype.element_ty))
    desc_dv.store([n0, 0], dv.to(DV.dtype.element_ty))


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, row, delta, desc_k, desc_v, lo, hi, m0, diag, SKV, qk_scale,
                       slope2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, ALIBI: tl.constexpr, MASKED: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Accumulate dS K (unscaled) of one query block over the key blocks [lo, hi).

    ``row`` is the per-row term subtracted from the scores: the LSE, plus slope2 * (i - m0)
    for folded ALiBi.
    """
    offs_i = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = desc_k.load([start_n, 0])
        v = desc_v.load([start_n, 0])
        # both GEMMs on the scores first: the tensor cores run while exp2 does
        qk = tl.dot(q, k.T, input_precision=DOT_PRECISION)
        dp = tl.dot(do, v.T, input_precision=DOT_PRECISION)
        rel0 = start_n - m0 - diag
        if ALIBI == 2:
            col = slope2 * (rel0 + offs_j).to(tl.float32)
            p = tl.math.exp2(qk * qk_scale + col[None, :] - row[:, None])
        elif ALIBI == 1:
            rel = rel0 + offs_j[None, :] - offs_i[:, None]
            p = tl.math.exp2(qk * qk_scale - slope2 * tl.abs(rel).to(tl.float32) - row[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - row[:, None])
        if MASKED:
            keep = (start_n + offs_j)[None, :] < SKV
            if CAUSAL:
                keep = keep & ((offs_j[None, :] - offs_i[:, None]) <= -rel0)
            p = tl.where(keep, p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V,  # forward inputs, strides stride_q*/k*/v*
    DO,  # output gradient, (B, H, SQ, HEAD_DIM), strides stride_do*
    DQ,  # query gradient (written), (B, H, SQ, HEAD_DIM), strides stride_dq*
    LSE, DELTA,  # base-2 logsumexp and rowsum(dO * O), fp32, contiguous (B, H, SQ)
    SLOPES,  # ALiBi slopes, fp32, (H,) (unused if ALIBI == 0)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, SQ, SKV, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per iteration
    CAUSAL: tl.constexpr,
    ALIBI: tl.constexpr,  # 0 none, 1 exact, 2 folded
    DOT_PRECISION: tl.constexpr,
):
    """dQ = scale * dS K for one query block of one (batch, head), same key bounds as the
    forward. Grid (cdiv(SQ, BLOCK_M), B * H), causal blocks last to first."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    desc_q = _head_desc(Q, off_b, off_h, stride_qb, stride_qh, stride_qm, stride_qd, SQ,
                        HEAD_DIM, BLOCK_M, BLOCK_D)
    desc_do = _head_desc(DO, off_b, off_h, stride_dob, stride_doh, stride_dom, stride_dod, SQ,
                         HEAD_DIM, BLOCK_M, BLOCK_D)
    desc_k = _head_desc(K, off_b, off_h, stride_kb, stride_kh, stride_kn, stride_kd, SKV,
                        HEAD_DIM, BLOCK_N, BLOCK_D)
    desc_v = _head_desc(V, off_b, off_h, stride_vb, stride_vh, stride_vn, stride_vd, SKV,
                        HEAD_DIM, BLOCK_N, BLOCK_D)
    desc_dq = _head_desc(DQ, off_b, off_h, stride_dqb, stride_dqh, stride_dqm, stride_dqd, SQ,
                         HEAD_DIM, BLOCK_M, BLOCK_D)
    m0 = pid_m * BLOCK_M
    diag = SKV - SQ
    offs_i = tl.arange(0, BLOCK_M)
    rows = m0 + offs_i
    row_off = off_bh.to(tl.int64) * SQ
    row = tl.load(LSE + row_off + rows, mask=rows < SQ, other=float("inf"))
    delta = tl.load(DELTA + row_off + rows, mask=rows < SQ, other=0.0)
    slope2 = 0.0
    if ALIBI != 0:
        slope2 = tl.load(SLOPES + off_h) * 1.4426950408889634
    if ALIBI == 2:
        row += slope2 * offs_i.to(tl.float32)
    q = desc_q.load([m0, 0])
    do = desc_do.load([m0, 0])
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _causal_key_bounds(m0, diag, SKV, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, row, delta, desc_k, desc_v, 0, full, m0, diag, SKV,
                            qk_scale, slope2, BLOCK_M, BLOCK_N, CAUSAL, ALIBI, False,
                            DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, row, delta, desc_k, desc_v, full, hi, m0, diag, SKV,
                            qk_scale, slope2, BLOCK_M, BLOCK_N, CAUSAL, ALIBI, True,
                            DOT_PRECISION)
    desc_dq.store([m0, 0], (dq * scale).to(DQ.dtype.element_ty))


@triton.jit
def attn_bwd_dq_convert_kernel(
    DQ_ACC,  # fp32 dS K accumulator, contiguous (B * H * SQ, HEAD_DIM)
    DQ,  # query gradient (written), contiguous, same shape, Q's dtype
    n_rows,  # B * H * SQ
    scale,  # softmax scale
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """DQ = scale * DQ_ACC in DQ's dtype. Grid (cdiv(n_rows, BLOCK_M),)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    offs = rows[:, None] * HEAD_DIM + cols[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    dq = tl.load(DQ_ACC + offs, mask=mask) * scale
    tl.store(DQ + offs, dq.to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers (checked tensors in; see ops/attention.py)
# ---------------------------------------------------------------------------------------------


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch for the tensor descriptors the kernels create."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _strides(t: torch.Tensor) -> list[int]:
    """The 4 strides of ``t``; a dim of size 1 (never stepped) gets D, so that every stride
    a descriptor sees is a 16-byte multiple whatever the caller's view had there."""
    return [s if n > 1 else t.shape[-1] for n, s in zip(t.shape, t.stride(), strict=True)]


def _alibi_mode(slopes: torch.Tensor | None, causal: bool, dtype: torch.dtype) -> int:
    """ALIBI constexpr: 0 none, 2 folded (causal, 16-bit), 1 exact (see the module doc)."""
    if slopes is None:
        return 0
    return 2 if causal and dtype != torch.float32 else 1


def _dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if (dtype != torch.float32 or allow_tf32) else "ieee"


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None, causal: bool,
    scale: float, allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. q (B, H, Sq, D), k, v (B, H, Skv, D), slopes fp32 (H,) or None.

    Returns (out contiguous (B, H, Sq, D) in q's dtype, lse fp32 contiguous (B, H, Sq)).
    """
    B, H, SQ, D = q.shape
    SKV = k.shape[2]
    out = empty(q.shape, q.dtype, q.device)
    lse = empty((B, H, SQ), torch.float32, q.device)
    alibi = _alibi_mode(slopes, causal, q.dtype)
    cfg, _ = config_for(D, q.dtype, causal, SKV if alibi == 2 else None)
    triton.set_allocator(_scratch)
    grid = (triton.cdiv(SQ, cfg.block_m), B * H)
    attn_fwd_kernel[grid](
        q, k, v, out, lse, slopes if slopes is not None else lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, SQ, SKV, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, ALIBI=alibi, DOT_PRECISION=_dot_precision(q.dtype, allow_tf32),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, slopes: torch.Tensor | None, causal: bool, scale: float, allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: delta, then dK/dV (and dQ by atomics) or dK/dV then dQ.

    do, out (B, H, Sq, D); q (B, H, Sq, D); k, v (B, H, Skv, D); lse fp32 contiguous (B, H, Sq).
    Returns contiguous (dq, dk, dv) in q's dtype.
    """
    B, H, SQ, D = q.shape
    SKV = k.shape[2]
    BD = block_d(D)
    _, cfg = config_for(D, q.dtype, causal)
    precision = _dot_precision(q.dtype, allow_tf32)
    alibi = _alibi_mode(slopes, causal, q.dtype)
    slopes_arg = lse if slopes is None else slopes
    triton.set_allocator(_scratch)

    delta = empty((B, H, SQ), torch.float32, q.device)
    attn_bwd_delta_kernel[(triton.cdiv(SQ, DELTA_BLOCK_M), B * H)](
        out, do, delta, *_strides(out), *_strides(do), H, SQ,
        HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=DELTA_BLOCK_M,
    )
    dk = empty(k.shape, q.dtype, q.device)
    dv = empty(v.shape, q.dtype, q.device)
    dq_acc = lse  # placeholder argument unless dQ is accumulated by the dK/dV kernel
    if cfg.dq_atomic:
        dq_acc = torch.zeros((B, H, SQ, D), dtype=torch.float32, device=q.device)
    attn_bwd_dkdv_kernel[(triton.cdiv(SKV, cfg.block_n), B * H)](
        q, k, v, do, dk, dv, dq_acc, lse, delta, slopes_arg,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        H, SQ, SKV, scale * LOG2E, scale,
        HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, ALIBI=alibi, DQ_ATOMIC=cfg.dq_atomic, TMA_REDUCE=not INTERPRET,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dq = empty(q.shape, q.dtype, q.device)
    if cfg.dq_atomic:
        n_rows = B * H * SQ
        attn_bwd_dq_convert_kernel[(triton.cdiv(n_rows, DELTA_BLOCK_M),)](
            dq_acc, dq, n_rows, scale, HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=DELTA_BLOCK_M,
        )
    else:
        attn_bwd_dq_kernel[(triton.cdiv(SQ, cfg.dq_block_m), B * H)](
            q, k, v, do, dq, lse, delta, slopes_arg,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            H, SQ, SKV, scale * LOG2E, scale,
            HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n,
            CAUSAL=causal, ALIBI=alibi, DOT_PRECISION=precision,
            num_warps=cfg.dq_num_warps, num_stages=cfg.dq_num_stages,
        )
    return dq, dk, dv
