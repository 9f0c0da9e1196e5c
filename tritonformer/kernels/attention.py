"""Flash attention (FlashAttention-2 structure): forward, backward, ALiBi, causal bottom-right.

Shapes: q (B, H, Sq, D), k and v (B, H, Skv, D), any strides whose last is 1 and whose others
are multiples of 16 bytes (``ops.attention`` copies anything else). Each program works on one
(batch, head) and reads and writes its tiles through 4-D tensor descriptors over (B, H, S, D)
made on the host (TMA on Hopper; boxes [1, 1, rows, BLOCK_D]), so a program sets nothing up;
they zero-fill rows past Sq/Skv and columns past D (stores are clipped there), so D is padded
to the power of two BLOCK_D without any masked load. On sm_90 the fp16/bf16 forward at D 64
and 128 runs the Gluon kernel of attention_gluon.py instead (``GLUON_FWD``), which overlaps
the softmax with the tensor cores, and so does the backward (``GLUON_BWD``), exact ALiBi
excepted.

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
from triton.tools.tensor_descriptor import TensorDescriptor

from ..runtime import INTERPRET, empty, is_hopper, launch

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
# on the lent GPU (H200s, docs/perf/attention.md, scripts/tune_attention.py; the forward again
# on an H100 once the descriptors moved to the host, v3: 3 stages at BLOCK_D 64, which also
# keeps ALiBi's extra FADD per score within 5-8%; the dK/dV tiles at BLOCK_D 128 on an H100,
# v6: 128 keys per program, 8 warps, 3 stages); 16 and 32 take the 64 entry, the full-mask
# entries the causal ones; 256 and fp32 were sized offline (sm_90 compiles: shared memory,
# registers, spills), not timed. One warpgroup per program with 64-row tiles won: two
# programs share an SM and hide each other's softmax.
# Under the interpreter one entry serves all: few, large blocks.
# ---------------------------------------------------------------------------------------------
_16 = "16-bit"
_32 = "fp32"
CONFIGS: dict[tuple[int, str, bool], tuple[FwdConfig, BwdConfig]] = {
    (16, _16, True): (FwdConfig(64, 64, 4, 3), BwdConfig(64, 64, 4, 3, True, 64, 64, 4, 2)),
    (16, _16, False): (FwdConfig(64, 64, 4, 3), BwdConfig(64, 64, 4, 3, True, 64, 64, 4, 2)),
    (32, _16, True): (FwdConfig(64, 64, 4, 3), BwdConfig(64, 64, 4, 3, True, 64, 64, 4, 2)),
    (32, _16, False): (FwdConfig(64, 64, 4, 3), BwdConfig(64, 64, 4, 3, True, 64, 64, 4, 2)),
    (64, _16, True): (FwdConfig(64, 64, 4, 3), BwdConfig(64, 64, 4, 3, True, 64, 64, 4, 2)),
    (64, _16, False): (FwdConfig(64, 64, 4, 3), BwdConfig(64, 64, 4, 3, True, 64, 64, 4, 2)),
    (128, _16, True): (FwdConfig(64, 64, 4, 3), BwdConfig(64, 128, 8, 3, False, 128, 64, 8, 3)),
    (128, _16, False): (FwdConfig(64, 64, 4, 3), BwdConfig(64, 128, 8, 3, False, 128, 64, 8, 3)),
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
# The Gluon forward (attention_gluon.py) replaces the forward above on sm_90 for fp16/bf16 at
# these (head dim, folded ALiBi) (exact ALiBi stays above): a list of (longest Skv, tiling),
# shortest first, None for any length; tiling (BLOCK_M, BLOCK_N, K_STAGES, V_STAGES), BLOCK_M
# 128 the warp-specialised kernel. From scripts/sweep_gluon_attention.py on the H100
# (docs/perf/attention.md, v5 and v6); None turns it off.
GLUON_FWD: dict[tuple[int, bool], list[tuple[int | None, tuple[int, int, int, int]]]] | None = {
    (64, False): [(None, (64, 128, 2, 2))],
    # 128-key blocks need V_STAGES 1 with ALiBi (its bias operand pushes two value stages past
    # a third program's shared memory) and waste more of the diagonal block at short lengths
    (64, True): [(2048, (64, 64, 2, 2)), (None, (64, 128, 2, 1))],
    (128, False): [(None, (128, 128, 2, 2))],
    (128, True): [(None, (128, 128, 2, 2))],
}
# The Gluon backward (attention_gluon.attn_bwd_gluon_kernel) replaces the dK/dV and dQ kernels
# above on sm_90 for fp16/bf16 (exact ALiBi excepted), outside deterministic mode (dQ is
# reduce-added), at these head dims: tiling (BLOCK_M, BLOCK_N, STAGES, DQ_BUFS), BLOCK_N // 16
# warps. Swept on the H100 at the model benchmark's shapes (docs/perf/attention.md, v8,
# scripts/sweep_gluon_attention_bwd.py): D64 one warpgroup per program, two programs per SM;
# D128 two warpgroups over 128 keys, one program per SM (64 keys per program spill more and
# lose the shared loads). None turns it off.
GLUON_BWD: dict[int, tuple[int, int, int, int]] | None = {
    64: (64, 64, 3, 2),
    128: (64, 128, 1, 2),
}
INTERPRET_CONFIG = (FwdConfig(64, 64, 4, 1), BwdConfig(64, 64, 4, 1, False, 64, 64, 4, 1))
DELTA_BLOCK_M = 64  # rows per program of the delta = rowsum(dO * O) and dQ-conversion kernels


def block_d(head_dim: int) -> int:
    """Head dim padded to the power of two the kernels tile with (at least 16, for tl.dot)."""
    return max(16, triton.next_power_of_2(head_dim))


def config_for(head_dim: int, dtype: torch.dtype, causal: bool) -> tuple[FwdConfig, BwdConfig]:
    """The (forward, backward) tuning entry for this head dim, dtype and mask.

    Under the interpreter: INTERPRET_CONFIG's blocks with the compiled entry's dQ strategy, so
    the CPU tests run both the dQ kernel and the dQ reduce-adds. The reduce-adds sum dQ in an
    order that varies from run to run: under ``torch.use_deterministic_algorithms(True)`` the
    dQ kernel runs instead.
    """
    fwd, bwd = CONFIGS[(block_d(head_dim), _32 if dtype == torch.float32 else _16, causal)]
    if torch.are_deterministic_algorithms_enabled():
        bwd = bwd._replace(dq_atomic=False)
    if INTERPRET:
        return INTERPRET_CONFIG[0], INTERPRET_CONFIG[1]._replace(dq_atomic=bwd.dq_atomic)
    return fwd, bwd


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load(desc, off_b, off_h, row):
    """The tile at sequence position ``row`` of head (off_b, off_h): [rows, BLOCK_D] of a
    descriptor whose box is [1, 1, rows, BLOCK_D]."""
    return desc.load([off_b, off_h, row, 0]).reshape(desc.block_shape[2], desc.block_shape[3])


@triton.jit
def _store(desc, off_b, off_h, row, x):
    """Store the [rows, BLOCK_D] tile x at sequence position ``row`` of head (off_b, off_h)."""
    desc.store([off_b, off_h, row, 0], x.reshape(desc.block_shape))


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
def _attn_fwd_step(acc, l_i, m_i, qk, desc_v, off_b, off_h, start_n, rel0, qk_scale, slope2,
                   col, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIBI: tl.constexpr,
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
    v = _load(desc_v, off_b, off_h, start_n)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_unmasked(acc, l_i, m_i, q, desc_k, desc_v, off_b, off_h, hi, m0, diag, qk_scale,
                       slope2,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIBI: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Online softmax over the fully visible key blocks [0, hi), hi a multiple of BLOCK_N."""
    col = slope2 * tl.arange(0, BLOCK_N).to(tl.float32)
    for start_n in tl.range(0, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        qk = tl.dot(q, _load(desc_k, off_b, off_h, start_n).T, input_precision=DOT_PRECISION)
        acc, l_i, m_i = _attn_fwd_step(acc, l_i, m_i, qk, desc_v, off_b, off_h, start_n,
                                       start_n - m0 - diag, qk_scale, slope2, col, BLOCK_M,
                                       BLOCK_N, ALIBI, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_masked(acc, l_i, m_i, q, desc_k, desc_v, off_b, off_h, lo, hi, m0, diag, SKV,
                     qk_scale, slope2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks [lo, hi) that need the causal or the tail mask."""
    offs_i = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        qk = tl.dot(q, _load(desc_k, off_b, off_h, start_n).T, input_precision=DOT_PRECISION)
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
        v = _load(desc_v, off_b, off_h, start_n)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def attn_fwd_kernel(
    desc_q,  # queries, (B, H, SQ, D), box [1, 1, BLOCK_M, BLOCK_D]
    desc_k,  # keys, (B, H, SKV, D), box [1, 1, BLOCK_N, BLOCK_D]
    desc_v,  # values, (B, H, SKV, D), box [1, 1, BLOCK_N, BLOCK_D]
    desc_o,  # output (written), (B, H, SQ, D), box [1, 1, BLOCK_M, BLOCK_D], q's dtype
    LSE,  # logsumexp (written), fp32, contiguous (B, H, SQ), base 2, +inf for empty rows
    SLOPES,  # ALiBi slopes, fp32, (H,) (unused if ALIBI == 0)
    H,  # number of heads
    SQ,  # query length
    SKV,  # key/value length
    qk_scale,  # softmax scale * log2(e)
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
    m0 = pid_m * BLOCK_M
    diag = SKV - SQ
    slope2 = 0.0
    if ALIBI != 0:
        slope2 = tl.load(SLOPES + off_h) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q = _load(desc_q, off_b, off_h, m0)
    full, hi = _causal_key_bounds(m0, diag, SKV, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_unmasked(acc, l_i, m_i, q, desc_k, desc_v, off_b, off_h, full, m0,
                                       diag, qk_scale, slope2, BLOCK_M, BLOCK_N, ALIBI,
                                       DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_masked(acc, l_i, m_i, q, desc_k, desc_v, off_b, off_h, full, hi, m0,
                                     diag, SKV, qk_scale, slope2, BLOCK_M, BLOCK_N, CAUSAL, ALIBI,
                                     DOT_PRECISION)

    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    _store(desc_o, off_b, off_h, m0, (acc / l_safe[:, None]).to(desc_o.dtype))
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
    DELTA,  # rowsum(dO * O) (written), fp32, contiguous (B, H, SQ); with STATS (B * H, 2, SQP)
    LSE,  # forward logsumexp, fp32, contiguous (B, H, SQ) (read with STATS)
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, SQ,
    SQP,  # with STATS: SQ rounded up to whole blocks of every row block that reads DELTA
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    STATS: tl.constexpr,  # DELTA holds the Gluon backward's per-row statistics
):
    """delta_i = sum_d dO_id O_id in fp32. Grid (cdiv(SQ, BLOCK_M), B * H); with STATS
    (SQP // BLOCK_M, B * H) and DELTA the Gluon backward's rows of (LSE, delta) per (batch,
    head), padded to SQP rows (+inf and 0 past SQ: no masks, whole TMA boxes)."""
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
    if STATS:
        lse = tl.load(LSE + off_bh.to(tl.int64) * SQ + rows, mask=rows < SQ,
                      other=float("inf"))
        base = DELTA + off_bh.to(tl.int64) * 2 * SQP
        tl.store(base + rows, lse)
        tl.store(base + SQP + rows, delta)
    else:
        tl.store(DELTA + off_bh.to(tl.int64) * SQ + rows, delta, mask=rows < SQ)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, desc_q, desc_do, desc_dq, off_b, off_h, lse_ptr, delta_ptr,
                         dq_ptr, lo, hi, n0, diag, SQ, SKV, qk_scale, slope2,
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
        q = _load(desc_q, off_b, off_h, start_m)
        do = _load(desc_do, off_b, off_h, start_m)
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
                desc_dq.atomic_add([off_b, off_h, start_m, 0], dq.reshape(desc_dq.block_shape))
            else:
                cols = tl.arange(0, dq.shape[1])
                tl.atomic_add(dq_ptr + rows.to(tl.int64)[:, None] * HEAD_DIM + cols[None, :], dq,
                              mask=(rows < SQ)[:, None] & (cols < HEAD_DIM)[None, :],
                              sem="relaxed")
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    desc_q,  # forward queries, (B, H, SQ, D), box [1, 1, BLOCK_M, BLOCK_D]
    desc_do,  # output gradient, (B, H, SQ, D), box [1, 1, BLOCK_M, BLOCK_D]
    desc_k, desc_v,  # forward keys, values: (B, H, SKV, D), box [1, 1, BLOCK_N, BLOCK_D]
    desc_dk, desc_dv,  # their gradients (written), (B, H, SKV, D), box [1, 1, BLOCK_N, BLOCK_D]
    desc_dq,  # DQ_ACC's descriptor, box [1, 1, BLOCK_M, BLOCK_D] (if DQ_ATOMIC and TMA_REDUCE)
    DQ_ACC,  # fp32 dS K accumulator, zero-filled, contiguous (B, H, SQ, HEAD_DIM) (if DQ_ATOMIC)
    LSE,  # forward logsumexp (base 2), fp32, contiguous (B, H, SQ)
    DELTA,  # rowsum(dO * O), fp32, contiguous (B, H, SQ)
    SLOPES,  # ALiBi slopes, fp32, (H,) (unused if ALIBI == 0)
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
    row_off = off_bh.to(tl.int64) * SQ
    dq_ptr = DQ_ACC + row_off * HEAD_DIM
    n0 = pid_n * BLOCK_N
    diag = SKV - SQ
    slope2 = 0.0
    if ALIBI != 0:
        slope2 = tl.load(SLOPES + off_h) * 1.4426950408889634

    k = _load(desc_k, off_b, off_h, n0)
    v = _load(desc_v, off_b, off_h, n0)
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
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, desc_q, desc_do, desc_dq, off_b, off_h,
                                  LSE + row_off, DELTA + row_off, dq_ptr, lo, full, n0, diag, SQ,
                                  SKV, qk_scale, slope2, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL,
                                  ALIBI, True, DQ_ATOMIC, TMA_REDUCE, DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, desc_q, desc_do, desc_dq, off_b, off_h,
                                  LSE + row_off, DELTA + row_off, dq_ptr, full, end, n0, diag, SQ,
                                  SKV, qk_scale, slope2, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL,
                                  ALIBI, False, DQ_ATOMIC, TMA_REDUCE, DOT_PRECISION)
    _store(desc_dk, off_b, off_h, n0, (dk * scale).to(desc_dk.dtype))
    _store(desc_dv, off_b, off_h, n0, dv.to(desc_dv.dtype))


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, row, delta, desc_k, desc_v, off_b, off_h, lo, hi, m0, diag, SKV,
                       qk_scale, slope2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
        k = _load(desc_k, off_b, off_h, start_n)
        v = _load(desc_v, off_b, off_h, start_n)
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
    desc_q,  # forward queries, (B, H, SQ, D), box [1, 1, BLOCK_M, BLOCK_D]
    desc_do,  # output gradient, (B, H, SQ, D), box [1, 1, BLOCK_M, BLOCK_D]
    desc_k, desc_v,  # forward keys, values: (B, H, SKV, D), box [1, 1, BLOCK_N, BLOCK_D]
    desc_dq,  # query gradient (written), (B, H, SQ, D), box [1, 1, BLOCK_M, BLOCK_D]
    LSE, DELTA,  # base-2 logsumexp and rowsum(dO * O), fp32, contiguous (B, H, SQ)
    SLOPES,  # ALiBi slopes, fp32, (H,) (unused if ALIBI == 0)
    H, SQ, SKV, qk_scale, scale,
    BLOCK_D: tl.constexpr,
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
    q = _load(desc_q, off_b, off_h, m0)
    do = _load(desc_do, off_b, off_h, m0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _causal_key_bounds(m0, diag, SKV, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, row, delta, desc_k, desc_v, off_b, off_h, 0, full, m0, diag,
                            SKV, qk_scale, slope2, BLOCK_M, BLOCK_N, CAUSAL, ALIBI, False,
                            DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, row, delta, desc_k, desc_v, off_b, off_h, full, hi, m0,
                            diag, SKV, qk_scale, slope2, BLOCK_M, BLOCK_N, CAUSAL, ALIBI, True,
                            DOT_PRECISION)
    _store(desc_dq, off_b, off_h, m0, (dq * scale).to(desc_dq.dtype))


@triton.jit
def attn_bwd_dq_convert_kernel(
    DQ_ACC,  # fp32 dS K accumulator, contiguous (B, H, SQ, HEAD_DIM)
    DQ,  # query gradient (written), (B, H, SQ, HEAD_DIM), strides stride_dq*, Q's dtype
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, SQ,
    scale,  # softmax scale
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """DQ = scale * DQ_ACC in DQ's dtype and layout. Grid (cdiv(SQ, BLOCK_M), B * H)."""
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < SQ) & (cols[None, :] < HEAD_DIM)
    r64 = rows.to(tl.int64)[:, None]
    dq = tl.load(DQ_ACC + (off_bh.to(tl.int64) * SQ + r64) * HEAD_DIM + cols[None, :],
                 mask=mask) * scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + r64 * stride_dqm
             + cols[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers (checked tensors in; see ops/attention.py)
# ---------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor) -> list[int]:
    """The 4 strides of ``t``; a dim of size 1 (never stepped) gets D, so that every stride
    a descriptor sees is a 16-byte multiple whatever the caller's view had there."""
    return [s if n > 1 else t.shape[-1] for n, s in zip(t.shape, t.stride(), strict=True)]


def _desc(t: torch.Tensor, rows: int, block_d: int) -> TensorDescriptor:
    """The descriptor the kernels read or write ``t`` (B, H, S, D) through: [1, 1, rows,
    block_d] boxes, zero-filled past S and D. Built without TensorDescriptor's checks (ops/
    attention.py has made the layout TMA-ready; they cost ~3 us of host time each)."""
    d = object.__new__(TensorDescriptor)
    d.base, d.shape, d.strides = t, list(t.shape), _strides(t)
    d.block_shape, d.padding = [1, 1, rows, block_d], "zero"
    return d


def heads_interleaved(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty (B, H, S, D) tensor laid out as (B, S, H, D) in memory (its transpose(1, 2) is
    contiguous), the layout of a projection's output: the attention's output and the key and
    value gradients reshape to or from (B, S, H * D) without a copy."""
    B, H, S, D = shape
    return empty((B, S, H, D), dtype, device).transpose(1, 2)


def _alibi_mode(slopes: torch.Tensor | None, causal: bool, dtype: torch.dtype) -> int:
    """ALIBI constexpr: 0 none, 2 folded (causal, 16-bit), 1 exact (see the module doc)."""
    if slopes is None:
        return 0
    return 2 if causal and dtype != torch.float32 else 1


def _dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if (dtype != torch.float32 or allow_tf32) else "ieee"


def gluon_tiling(head_dim: int, alibi: int, skv: int) -> tuple[int, int, int, int] | None:
    """The Gluon forward's tiling for this head dim, ALIBI mode and key length from
    ``GLUON_FWD``; None where that kernel does not run (exact ALiBi, other head dims)."""
    if GLUON_FWD is None or alibi == 1:
        return None
    for longest, tiling in GLUON_FWD.get((head_dim, alibi == 2), []):
        if longest is None or skv <= longest:
            return tiling
    return None


def gluon_bwd_tiling(head_dim: int, alibi: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[int, int, int, int] | None:
    """The Gluon backward's tiling from ``GLUON_BWD``; None where it does not run (exact
    ALiBi, fp32, other head dims, deterministic mode, not sm_90, the interpreter)."""
    if (GLUON_BWD is None or alibi == 1 or dtype == torch.float32
            or torch.are_deterministic_algorithms_enabled() or not is_hopper(device)):
        return None
    return GLUON_BWD.get(head_dim)


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None, causal: bool,
    scale: float, allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. q (B, H, Sq, D), k, v (B, H, Skv, D), slopes fp32 (H,) or None.

    Returns (out (B, H, Sq, D) in q's dtype laid out as (B, Sq, H, D) (``heads_interleaved``),
    lse fp32 contiguous (B, H, Sq)).
    """
    B, H, SQ, D = q.shape
    SKV = k.shape[2]
    alibi = _alibi_mode(slopes, causal, q.dtype)
    tiling = gluon_tiling(D, alibi, SKV)
    if tiling is not None and q.dtype != torch.float32 and is_hopper(q.device):
        from .attention_gluon import attention_fwd_gluon

        return attention_fwd_gluon(q, k, v, causal, scale, slopes, *tiling)
    out = heads_interleaved(q.shape, q.dtype, q.device)
    lse = empty((B, H, SQ), torch.float32, q.device)
    cfg, _ = config_for(D, q.dtype, causal)
    BD = block_d(D)
    grid = (triton.cdiv(SQ, cfg.block_m), B * H)
    launch(attn_fwd_kernel, grid, (
        _desc(q, cfg.block_m, BD), _desc(k, cfg.block_n, BD), _desc(v, cfg.block_n, BD),
        _desc(out, cfg.block_m, BD), lse, slopes if slopes is not None else lse,
        H, SQ, SKV, scale * LOG2E,
    ), dict(BLOCK_D=BD, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            CAUSAL=causal, ALIBI=alibi, DOT_PRECISION=_dot_precision(q.dtype, allow_tf32)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def _dq_convert(dq_acc: torch.Tensor, dq: torch.Tensor, scale: float) -> None:
    """dq = scale * dq_acc (fp32 contiguous (B, H, Sq, D)) in dq's dtype and strides."""
    B, H, SQ, D = dq.shape
    launch(attn_bwd_dq_convert_kernel, (triton.cdiv(SQ, DELTA_BLOCK_M), B * H),
           (dq_acc, dq, *dq.stride(), H, SQ, scale),
           dict(HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=DELTA_BLOCK_M))


def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, slopes: torch.Tensor | None, causal: bool, scale: float, allow_tf32: bool,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: on sm_90 where ``gluon_bwd_tiling`` allows, the (LSE, delta)
    rows, the Gluon kernel and dQ's conversion; else delta, then dK/dV (and dQ by atomics) or
    dK/dV then dQ.

    do, out (B, H, Sq, D); q (B, H, Sq, D); k, v (B, H, Skv, D); lse fp32 contiguous (B, H, Sq).
    grads: None, or (dq, dk, dv) to write in place: q's, k's and v's shapes, q's dtype, any
    strides a descriptor takes (last 1, others 16-byte multiples, 16-byte-aligned data), e.g.
    the views ``attention_bwd_packed`` gives. Returns (dq, dk, dv) in q's dtype: ``grads``,
    else new tensors, dq contiguous, dk and dv laid out as (B, Skv, H, D)
    (``heads_interleaved``).
    """
    B, H, SQ, D = q.shape
    SKV = k.shape[2]
    BD = block_d(D)
    alibi = _alibi_mode(slopes, causal, q.dtype)
    if grads is None:
        grads = (empty(q.shape, q.dtype, q.device), heads_interleaved(k.shape, q.dtype, q.device),
                 heads_interleaved(v.shape, q.dtype, q.device))  # fmt: skip
    dq, dk, dv = grads
    tiling = gluon_bwd_tiling(D, alibi, q.dtype, q.device)
    if tiling is not None:
        from .attention_gluon import attention_bwd_gluon

        rows = max(tiling[0], DELTA_BLOCK_M)  # both kernels' row blocks are whole in sqp
        sqp = triton.cdiv(SQ, rows) * rows
        stats = empty((B * H, 2, sqp), torch.float32, q.device)
        launch(attn_bwd_delta_kernel, (sqp // DELTA_BLOCK_M, B * H),
               (out, do, stats, lse, *_strides(out), *_strides(do), H, SQ, sqp),
               dict(HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=DELTA_BLOCK_M, STATS=True))
        dq_acc = torch.zeros((B, H, SQ, D), dtype=torch.float32, device=q.device)
        attention_bwd_gluon(do, q, k, v, stats, dq_acc, dk, dv, causal, scale, slopes, *tiling)
        _dq_convert(dq_acc, dq, scale)
        return dq, dk, dv
    _, cfg = config_for(D, q.dtype, causal)
    precision = _dot_precision(q.dtype, allow_tf32)
    slopes_arg = lse if slopes is None else slopes
    delta = empty((B, H, SQ), torch.float32, q.device)
    launch(attn_bwd_delta_kernel, (triton.cdiv(SQ, DELTA_BLOCK_M), B * H),
           (out, do, delta, lse, *_strides(out), *_strides(do), H, SQ, 0),
           dict(HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=DELTA_BLOCK_M, STATS=False))
    desc_q = _desc(q, cfg.block_m, BD)
    dq_acc, desc_dq = lse, desc_q  # placeholders unless the dK/dV kernel accumulates dQ
    tma_reduce = not INTERPRET  # the interpreter has no TMA reduce: atomics on pointers
    if cfg.dq_atomic:
        dq_acc = torch.zeros((B, H, SQ, D), dtype=torch.float32, device=q.device)
        desc_dq = _desc(dq_acc, cfg.block_m, BD) if tma_reduce else desc_q
    launch(attn_bwd_dkdv_kernel, (triton.cdiv(SKV, cfg.block_n), B * H), (
        desc_q, _desc(do, cfg.block_m, BD), _desc(k, cfg.block_n, BD), _desc(v, cfg.block_n, BD),
        _desc(dk, cfg.block_n, BD), _desc(dv, cfg.block_n, BD), desc_dq, dq_acc, lse, delta,
        slopes_arg, H, SQ, SKV, scale * LOG2E, scale,
    ), dict(HEAD_DIM=D, BLOCK_D=BD, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            CAUSAL=causal, ALIBI=alibi, DQ_ATOMIC=cfg.dq_atomic, TMA_REDUCE=tma_reduce,
            DOT_PRECISION=precision),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.dq_atomic:
        _dq_convert(dq_acc, dq, scale)
    else:
        bm, bn = cfg.dq_block_m, cfg.dq_block_n
        launch(attn_bwd_dq_kernel, (triton.cdiv(SQ, bm), B * H), (
            _desc(q, bm, BD), _desc(do, bm, BD), _desc(k, bn, BD), _desc(v, bn, BD),
            _desc(dq, bm, BD), lse, delta, slopes_arg, H, SQ, SKV, scale * LOG2E, scale,
        ), dict(BLOCK_D=BD, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n,
                CAUSAL=causal, ALIBI=alibi, DOT_PRECISION=precision),
            num_warps=cfg.dq_num_warps, num_stages=cfg.dq_num_stages)
    return dq, dk, dv


def attention_bwd_packed(
    do: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    slopes: torch.Tensor | None, causal: bool, scale: float, allow_tf32: bool,
) -> torch.Tensor:
    """The backward of attention over q, k, v packed in qkv (B, S, 3, H, D) (q, k, v its
    ``unbind(2)`` transposed to (B, H, S, D); strides as ``attention_bwd`` takes them).

    do, out (B, H, S, D); lse fp32 contiguous (B, H, S). Returns dqkv, a contiguous
    (B, S, 3, H, D) tensor in qkv's dtype: the three gradients written straight into their
    slots (no stacking copy; viewed as (B, S, 3 * H * D), it is the gradient of the qkv
    projection's output).
    """
    dqkv = empty(qkv.shape, qkv.dtype, qkv.device)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    attention_bwd(do, q, k, v, out, lse, slopes, causal, scale, allow_tf32,
                  grads=tuple(t.transpose(1, 2) for t in dqkv.unbind(2)))
    return dqkv
