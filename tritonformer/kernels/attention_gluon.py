"""Flash attention forward for Hopper (sm_90) in Gluon, 16-bit, head dim 64 or 128.

Triton 3.6 waits for every wgmma right after issuing it, so the ``tl.dot`` forward
(``attention.attn_fwd_kernel``) never overlaps the softmax of one key block with the tensor
cores. This kernel issues the wgmmas itself (FA3's intra-warpgroup pipelining, one 4-warp
warpgroup per 64 query rows):

    iteration j:  S_j = Q K_j^T (async)  |  O += P_{j-1} V_{j-1} (async)
                  wait until S_j is done (PV_{j-1} may still run), softmax(S_j) -> P_j
                  wait for PV_{j-1}, rescale O, refill the freed key and value stages by TMA

Keys and values have TMA rings of their own (K_STAGES, V_STAGES deep): a key stage is free
once its scores are done, one iteration before the value stage of the same block. P stays in
registers (the PV wgmma's A operand). ``attention_fwd`` dispatches here on sm_90 for fp16/bf16
at D 64 and 128 (``attention.GLUON_FWD``), except exact ALiBi (non-causal or fp32). Folded
ALiBi's column bias rides on the scores' wgmma as one more k-step (``_alibi_operands``), so the
softmax loop runs the same instructions with and without it.

Same conventions as ``attention.attn_fwd_kernel``: base-2 LSE, +inf for rows that see no
key, causal mask aligned bottom-right, query blocks last to first, ALiBi in the folded form
(causal 16-bit inputs). Tensors are read and written through 4-D TMA descriptors over
(B, H, S, D) with [1, 1, rows, D] boxes (zero-filled past S; stores clipped there). Gluon has
no interpreter: the GPU tier tests this kernel (tests/test_attention.py).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..runtime import empty
from .attention import LOG2E, _strides


@gluon.jit
def _issue(desc, smem, bars, j, n_blocks, off_b, off_h, BLOCK_N: gl.constexpr,
           STAGES: gl.constexpr):
    """TMA load of key (or value) block j into stage j % STAGES of its ring (skipped past the
    last block)."""
    slot = j % STAGES
    pred = j < n_blocks
    bar = bars.index(slot)
    mbarrier.expect(bar, desc.block_type.nbytes, pred)
    tma.async_copy_global_to_shared(desc, [off_b, off_h, j * BLOCK_N, 0], bar, smem.index(slot),
                                    pred)


@gluon.jit
def _alibi_operands(slope2, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    s_layout: gl.constexpr, b_smem):
    """ALiBi's in-block column bias slope2 * c, c = key - BLOCK_N / 2 for the keys of a block
    (centred: half the magnitude, so half the rounding), as one more k-step of 16 for the
    scores' wgmma: A [BLOCK_M, 16] (returned, registers) has columns (hi, mid, lo) = slope2 /
    qk_scale split over three bf16s, B [BLOCK_N, 16] (written into b_smem) has columns
    (c, c, c), exact in bf16 for |c| <= 256. The tensor cores then add c * slope2 / qk_scale
    to every raw score in fp32, so the softmax scales it with the scores and spends no
    instruction on it. bf16 whatever q's dtype: the products go into the fp32 accumulator
    either way, and bf16 has fp32's range."""
    blk: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [BLOCK_M // 16, 1], [1, 0])
    k16 = gl.arange(0, 16, layout=gl.SliceLayout(0, blk))
    r = slope2 / qk_scale
    hi = r.to(gl.bfloat16).to(gl.float32)
    mid = (r - hi).to(gl.bfloat16).to(gl.float32)
    lo = (r - hi - mid).to(gl.bfloat16).to(gl.float32)
    part = gl.where(k16 == 0, hi, gl.where(k16 == 1, mid, gl.where(k16 == 2, lo, 0.0)))
    a = gl.zeros([BLOCK_M, 16], gl.float32, blk) + part[None, :]
    c = (gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blk)) - BLOCK_N // 2).to(gl.float32)
    b = gl.where(k16[None, :] < 3, c[:, None], 0.0)
    b_smem.store(b.to(gl.bfloat16))
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    return gl.convert_layout(a.to(gl.bfloat16), a_layout)


@gluon.jit
def _scores(q2, k_stage, s_zero, bias_a, bias_b, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
            ALIBI: gl.constexpr, IS_ASYNC: gl.constexpr):
    """The raw scores Q K^T of one key stage [BLOCK_N, HEAD_DIM] (with ALIBI 2, plus the
    column bias of ``_alibi_operands``): the wgmma's result, or its token if IS_ASYNC."""
    k2 = k_stage.reshape([BLOCK_N, HEAD_DIM])
    s = warpgroup_mma(q2, k2.permute([1, 0]), s_zero, use_acc=False, is_async=IS_ASYNC)
    if ALIBI == 2:
        s = warpgroup_mma(bias_a, bias_b.permute([1, 0]), s, is_async=IS_ASYNC)
    return s


@gluon.jit
def _softmax_step(s, m_i, l_i, j, m0, diag, SKV, qk_scale, slope2, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, ALIBI: gl.constexpr,
                  s_layout: gl.constexpr):
    """Online-softmax update for the scores s [BLOCK_M, BLOCK_N] of key block j: returns
    (p fp32, alpha, m_new, l_new). Masks the causal diagonal and the key tail. ALIBI 2: s
    already holds the in-block column part of slope2 * (key - i - diag) (``_scores``); the
    block's offset slope2 * (start_n + BLOCK_N / 2 - m0 - diag), uniform over the block, goes
    in through the row max, and the per-row part -slope2 * (i - m0) is left to the caller
    (the LSE)."""
    start_n = j * BLOCK_N
    needs_mask = start_n + BLOCK_N > SKV
    if CAUSAL:
        needs_mask = needs_mask | (start_n + BLOCK_N - 1 > m0 + diag)
    if needs_mask:
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        keep = cols[None, :] < SKV
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + diag)
        s = gl.where(keep, s, float("-inf"))
    # qk_scale > 0: scale the row max, then one FMA per score
    m_blk = gl.max(s, 1) * qk_scale
    if ALIBI == 2:
        shift = slope2 * (start_n + BLOCK_N // 2 - m0 - diag).to(gl.float32)
        m_new = gl.maximum(m_i, m_blk + shift)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        p = gl.exp2(s * qk_scale - (m_use - shift)[:, None])
    else:
        m_new = gl.maximum(m_i, m_blk)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_new


@gluon.jit
def attn_fwd_gluon_kernel(
    desc_q,  # queries, (B, H, SQ, D), box [1, 1, BLOCK_M, D]
    desc_k,  # keys, (B, H, SKV, D), box [1, 1, BLOCK_N, D]
    desc_v,  # values, (B, H, SKV, D), box [1, 1, BLOCK_N, D]
    desc_o,  # output (written), (B, H, SQ, D), box [1, 1, BLOCK_M, D], q's dtype
    LSE,  # logsumexp (written), fp32, contiguous (B, H, SQ), base 2, +inf for empty rows
    SLOPES,  # ALiBi slopes, fp32, (H,) (unused if ALIBI == 0)
    H, SQ, SKV,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,  # 64 or 128: one warpgroup (4 warps) per 64 rows
    BLOCK_N: gl.constexpr,
    K_STAGES: gl.constexpr,  # key blocks in flight
    V_STAGES: gl.constexpr,  # value blocks in flight
    CAUSAL: gl.constexpr,
    ALIBI: gl.constexpr,  # 0 none, 2 folded (causal)
):
    dtype: gl.constexpr = desc_q.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0],
                                                       warps_per_cta=[BLOCK_M // 16, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0],
                                                       warps_per_cta=[BLOCK_M // 16, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    off_bh = gl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    m0 = pid_m * BLOCK_M
    diag = SKV - SQ
    hi = SKV
    if CAUSAL:
        hi = gl.maximum(gl.minimum(m0 + BLOCK_M + diag, SKV), 0)
    n_blocks = gl.cdiv(hi, BLOCK_N)
    slope2 = 0.0
    bias_a = 0
    bias_b = 0
    if ALIBI != 0:
        slope2 = gl.load(SLOPES + off_h) * 1.4426950408889634
        bias_b = gl.allocate_shared_memory(
            gl.bfloat16, [BLOCK_N, 16],
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, 16], gl.bfloat16))
        bias_a = _alibi_operands(slope2, qk_scale, BLOCK_M, BLOCK_N, s_layout, bias_b)

    q_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, HEAD_DIM], desc_q.layout)
    k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, 1, 1, BLOCK_N, HEAD_DIM],
                                       desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, 1, 1, BLOCK_N, HEAD_DIM],
                                       desc_v.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    # Keys and values have rings of their own: a key stage is free once its scores are done,
    # one iteration before the value stage of the same block.
    k_bars = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_bars.index(i), count=1)
    for i in gl.static_range(V_STAGES):
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()
    if ALIBI != 0:
        gl.thread_barrier()  # every thread's part of bias_b is written before a wgmma reads it

    mbarrier.expect(q_bar, desc_q.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_q, [off_b, off_h, m0, 0], q_bar, q_smem)
    for i in gl.static_range(K_STAGES):
        _issue(desc_k, k_smem, k_bars, i, n_blocks, off_b, off_h, BLOCK_N, K_STAGES)
    for i in gl.static_range(V_STAGES):
        _issue(desc_v, v_smem, v_bars, i, n_blocks, off_b, off_h, BLOCK_N, V_STAGES)

    q2 = q_smem.reshape([BLOCK_M, HEAD_DIM])
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    mbarrier.wait(q_bar, 0)

    if n_blocks > 0:
        # block 0: scores and softmax, nothing to overlap yet
        mbarrier.wait(k_bars.index(0), 0)
        s = _scores(q2, k_smem.index(0), s_zero, bias_a, bias_b, HEAD_DIM, BLOCK_N, ALIBI,
                    False)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, m0, diag, SKV, qk_scale, slope2,
                                           BLOCK_M, BLOCK_N, CAUSAL, ALIBI, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        gl.thread_barrier()  # every warp is done with key stage 0
        _issue(desc_k, k_smem, k_bars, K_STAGES, n_blocks, off_b, off_h, BLOCK_N, K_STAGES)
        for j in range(1, n_blocks):
            slot = j % K_STAGES
            prev = (j - 1) % V_STAGES
            mbarrier.wait(k_bars.index(slot), (j // K_STAGES) & 1)
            s_tok = _scores(q2, k_smem.index(slot), s_zero, bias_a, bias_b, HEAD_DIM, BLOCK_N,
                            ALIBI, True)
            mbarrier.wait(v_bars.index(prev), ((j - 1) // V_STAGES) & 1)
            v_prev = v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM])
            acc_tok = warpgroup_mma(p_op, v_prev, acc, is_async=True)
            # wgmma groups retire in issue order: S_j first, P_{j-1} V_{j-1} may still run
            s = warpgroup_mma_wait(1, deps=[s_tok])
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, j, m0, diag, SKV, qk_scale, slope2,
                                               BLOCK_M, BLOCK_N, CAUSAL, ALIBI, s_layout)
            acc = warpgroup_mma_wait(0, deps=[acc_tok])
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            gl.thread_barrier()  # every warp is done with key stage `slot`, value stage `prev`
            _issue(desc_k, k_smem, k_bars, j + K_STAGES, n_blocks, off_b, off_h, BLOCK_N,
                   K_STAGES)
            _issue(desc_v, v_smem, v_bars, j - 1 + V_STAGES, n_blocks, off_b, off_h, BLOCK_N,
                   V_STAGES)
        last = (n_blocks - 1) % V_STAGES
        mbarrier.wait(v_bars.index(last), ((n_blocks - 1) // V_STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc)

    empty_row = l_i == 0.0
    l_safe = gl.where(empty_row, 1.0, l_i)
    o = acc / gl.convert_layout(l_safe, o_rows)[:, None]
    q_smem.reshape([BLOCK_M, HEAD_DIM]).store(o.to(dtype))  # Q is no longer read: O's stage
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(desc_o, [off_b, off_h, m0, 0], q_smem)

    offs_i = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    lse2 = m_i + gl.log2(l_safe)
    if ALIBI == 2:
        lse2 -= slope2 * offs_i.to(gl.float32)  # the per-row part of the bias, left out above
    lse = gl.where(empty_row, float("inf"), lse2)
    rows = m0 + offs_i
    gl.store(LSE + off_bh.to(gl.int64) * SQ + rows, lse, mask=rows < SQ)
    tma.store_wait(0)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(K_STAGES):
        mbarrier.invalidate(k_bars.index(i))
    for i in gl.static_range(V_STAGES):
        mbarrier.invalidate(v_bars.index(i))


@functools.cache
def _layout(rows: int, d: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for(
        [1, 1, rows, d], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    )


def _gluon_desc(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A descriptor over ``t`` (B, H, S, D) with [1, 1, rows, D] boxes, zero-filled past S.
    Built without TensorDescriptor's checks, like ``attention._desc`` (ops/attention.py has
    made the layout TMA-ready; the checks cost ~3 us of host time per descriptor)."""
    d = t.shape[-1]
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides = t, list(t.shape), _strides(t)
    desc.block_shape, desc.layout, desc.padding = [1, 1, rows, d], _layout(rows, d, t.dtype), "zero"
    return desc


def attention_fwd_gluon(q, k, v, causal: bool, scale: float, slopes: torch.Tensor | None = None,
                        block_m: int = 64, block_n: int = 64, k_stages: int = 2,
                        v_stages: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward through ``attn_fwd_gluon_kernel`` on an sm_90 device.

    q (B, H, Sq, D), k, v (B, H, Skv, D): bf16 or fp16, D 64 or 128, layouts TMA can read
    (unit last stride, 16-byte aligned strides; ops/attention.py ensures it). slopes: fp32
    (H,), causal only (folded ALiBi). block_m (64 or 128, 4 warps per 64 rows), block_n,
    k_stages, v_stages: the kernel's tiling (``attention.gluon_tiling``).

    Returns (out contiguous (B, H, Sq, D) in q's dtype, lse fp32 contiguous (B, H, Sq)), like
    ``attention_fwd``.
    """
    if slopes is not None and not causal:
        raise ValueError("the Gluon forward takes ALiBi with the causal mask only")
    B, H, SQ, D = q.shape
    SKV = k.shape[2]
    out = empty(q.shape, q.dtype, q.device)
    lse = empty((B, H, SQ), torch.float32, q.device)
    grid = (triton.cdiv(SQ, block_m), B * H)
    attn_fwd_gluon_kernel[grid](
        _gluon_desc(q, block_m), _gluon_desc(k, block_n), _gluon_desc(v, block_n),
        _gluon_desc(out, block_m),
        lse, slopes if slopes is not None else lse, H, SQ, SKV, scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, K_STAGES=k_stages, V_STAGES=v_stages,
        CAUSAL=causal, ALIBI=0 if slopes is None else 2, num_warps=block_m // 16,
    )
    return out, lse
